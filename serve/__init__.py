"""``ddpm-serve``: an HTTP generation service whose scheduler batches the images of many requests, each at its own
denoising step, into one predictor call (continuous batching). Torch-free, like the runtime it is built on."""
