"""Proof that an exported model computes what the eager network computes; checks fail, they never merely warn.

The checks run over numpy nets ``net(x: (B,C,H,W) float32, t: (B,) int64, y: (B,) int64 | None) -> output``
(ε, v or x̂₀, as the contract's ``prediction`` says, its prediction channels; "ε" below; x is the latent of a latent
model) and, for a latent model, numpy decoders ``decode(z) -> image``:

* ``check_eps`` — per call, at t ∈ {0, T/2, T−1} and random t, batch sizes 1 and 5 (labels including the
  null label for conditional models that have one): |ε_exported − ε_eager| ≤ atol + rtol·|ε_eager| everywhere;
* ``check_decoder`` — a latent model's decoder per call, on the latents a real (eager) trajectory ends in, at batch
  sizes 4 and 1, within the same bound;
* ``check_trajectory`` — a short respaced Algorithm-2 run (4 images, 20 steps), and a DPM-Solver++(2M) run of
  10 steps (which carries the solver state), through both with identical injected noise, down to the final uint8
  images (decoded, for a latent model), which may differ by at most ``max_levels``.

Tolerances come from ``runtime.tolerances.TOLERANCES``; reports carry the largest difference and where it occurred.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from runtime.backends.backend import predicted
from runtime.backends.torch_backend import call_torch
from runtime.errors import reason
from runtime.metadata import SamplingContract
from runtime.sampling.engine import sample
from runtime.sampling.finish import decoder_input, finisher
from runtime.sampling.plan import make_plan
from runtime.sampling.samplers import SAMPLERS
from runtime.tolerances import TOLERANCES, Tolerance

NumpyNet = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]  # e.g. a backend's predict_eps


@dataclass
class EpsCheck:
    passed: bool
    calls: int
    max_abs_diff: float
    worst: dict  # where the largest excess over the tolerance occurred: case, t, label, index, values


# the second trajectory check runs the sampler that keeps the most history (ties: the first registered), so every
# history slot goes through the backend
MULTISTEP_CHECK = max(SAMPLERS.values(), key=lambda s: s.history).name
_DDPM = "ddpm"  # the first trajectory check's sampler (Algorithm 2, σ² = β̃)


@dataclass
class TrajectoryCheck:
    passed: bool
    images: int
    steps: int
    guidance: float
    max_level_diff: int
    pixels_differing: int
    worst_index: list[int]
    sampler: str = "ddpm"
    problem: str | None = None  # why the candidate's run could not finish, where it did not


@dataclass
class BackendResult:
    """The checks run against one backend (an artifact on one provider)."""

    backend: str
    passed: bool
    eps: EpsCheck | None = None
    decoder: EpsCheck | None = None  # a latent model's decoder, per call on the latents of a real trajectory
    trajectory: TrajectoryCheck | None = None  # DDPM (σ² = β̃), 20 steps
    multistep: TrajectoryCheck | None = None  # MULTISTEP_CHECK, 10 steps: the solver's history through the backend
    settings: dict | None = None  # the backend settings each check ran with, where they differ per check

    def summary(self) -> str:
        parts = []
        if self.eps is not None:
            parts.append(f"max |Δε| {self.eps.max_abs_diff:.2e} over {self.eps.calls} calls")
        if self.decoder is not None:
            parts.append(f"decoder max |Δ| {self.decoder.max_abs_diff:.2e} over {self.decoder.calls} calls")
        if self.trajectory is not None:
            parts.append(f"trajectory max Δ {self.trajectory.max_level_diff} uint8 levels")
        if self.multistep is not None:
            parts.append(f"{self.multistep.sampler} trajectory max Δ {self.multistep.max_level_diff}")
        return f"{self.backend}: {'ok' if self.passed else 'FAILED'} ({', '.join(parts)})"


@dataclass
class VerificationReport:
    """Everything verified (or skipped, with the reason) for one artifact."""

    tolerance: dict
    results: list[BackendResult] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    # checks on a provider the artifact does not target (fp16 on the CPU): they can fail an export, never pass it
    informational: list[BackendResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results + self.informational)

    @property
    def failed(self) -> bool:
        return any(not r.passed for r in self.results + self.informational)

    @property
    def verified(self) -> bool:
        return bool(self.results)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "tolerance": self.tolerance, "results": [asdict(r) for r in self.results],
                "skipped": self.skipped, "informational": [asdict(r) for r in self.informational]}


def eps_cases(contract: SamplingContract, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(name, x, t, y) inputs: t ∈ {0, T/2, T−1, random} at batch 1, and one batch of 5 mixing them (labels: classes
    and the null label)."""
    rng = np.random.default_rng(seed)
    T, shape = contract.schedule.timesteps, contract.latent_shape
    special = [0, T // 2, T - 1, int(rng.integers(1, T - 1))]
    k, last = contract.num_classes, contract.labels - 1  # the null label where there is one, else the last class
    cases = []
    for i, t in enumerate(special):
        y = np.array([last if i % 2 else int(rng.integers(0, k))], np.int64) if k else None
        cases.append((f"batch1_t{t}", rng.standard_normal((1, *shape)).astype(np.float32), np.array([t], np.int64), y))
    t5 = np.array([*special, int(rng.integers(0, T))], np.int64)
    y5 = np.array([*rng.integers(0, k, 4), last], np.int64) if k else None
    cases.append(("batch5_mixed_t", rng.standard_normal((5, *shape)).astype(np.float32), t5, y5))
    return cases


def check_eps(reference: NumpyNet, candidate: NumpyNet, contract: SamplingContract, tol: Tolerance,
              seed: int = 0) -> EpsCheck:
    """Per-call ε parity of ``candidate`` against ``reference`` (the eager U-Net)."""
    return _per_call([(name, (x, t, y), {"t": t, "label": y}) for name, x, t, y in eps_cases(contract, seed)],
                     reference, candidate, tol)


def _per_call(cases: list[tuple[str, tuple, dict]], reference: Callable, candidate: Callable,
              tol: Tolerance) -> EpsCheck:
    """|candidate(*args) − reference(*args)| ≤ atol + rtol·|reference| for each (name, args, per-row facts) case."""
    worst, worst_excess, max_abs, calls = {}, -np.inf, 0.0, 0
    for name, args, facts in cases:
        a, b = candidate(*args), reference(*args)
        calls += 1
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return EpsCheck(False, calls, float("inf"),
                            {"case": name, "problem": f"shape {a.shape} (expected {b.shape}) or non-finite values"})
        diff = np.abs(a.astype(np.float64) - b)
        excess = diff - (tol.atol + tol.rtol * np.abs(b))
        i = np.unravel_index(int(np.argmax(excess)), excess.shape)
        max_abs = max(max_abs, float(diff.max()))
        if excess[i] > worst_excess:
            worst_excess = float(excess[i])
            row = {k: None if v is None else int(v[i[0]]) for k, v in facts.items()}
            worst = {"case": name, "index": [int(v) for v in i], **row,
                     "exported": float(a[i]), "eager": float(b[i]), "abs_diff": float(diff[i])}
    return EpsCheck(worst_excess <= 0, calls, max_abs, worst)


def check_decoder(x0: np.ndarray, reference_decode: Callable, candidate_decode: Callable,
                  contract: SamplingContract, tol: Tolerance) -> EpsCheck:
    """Per-call parity of a latent model's decoder on ``x0``, the latents an eager trajectory ends in (scaled as the
    finish scales them): all of them in one call, then the first alone."""
    latents = decoder_input(contract, x0)
    return _per_call([("batch4_trajectory_latents", (latents,), {}), ("batch1", (latents[:1],), {})],
                     reference_decode, candidate_decode, tol)


def _trajectory(net: NumpyNet, contract: SamplingContract, sampler: str, n: int, steps: int, guidance: float | None,
                seed: int):
    """(x_0 of ``n`` images through ``net``, not finished; the plan; w): a respaced run with noise drawn from
    ``seed`` (the same for every net)."""
    w = guidance if guidance is not None else (2.0 if contract.guidable else 1.0)
    plan = make_plan(contract, sampler=sampler, steps=min(steps, contract.schedule.timesteps), guidance=w,
                     variance="beta_tilde" if sampler == _DDPM else None, model_defaults=False)
    rng = np.random.default_rng(seed)
    shape = (n, *contract.latent_shape)
    x_T = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal((plan.steps, *shape)).astype(np.float32)
    y = (np.arange(n) % contract.num_classes).astype(np.int64) if contract.conditional else None
    return sample(net, x_T, plan.coefs, lambda i: noise[i], labels=y, null_class=contract.null_class), plan, w


def check_trajectory(reference: NumpyNet, candidate: NumpyNet, contract: SamplingContract, tol: Tolerance, *,
                     n: int = 4, steps: int = 20, guidance: float | None = None, seed: int = 0,
                     sampler: str = _DDPM, decoders: tuple[Callable, Callable] | None = None,
                     reference_run: tuple | None = None) -> TrajectoryCheck:
    """Final uint8 images of a respaced run through both nets with identical injected noise: Algorithm 2 (σ² = β̃)
    by default, or another ``sampler``; a latent model's through ``decoders`` (the reference's, the candidate's).
    ``reference_run``: the reference's run with these settings (``_trajectory``'s result), where it is made already."""
    def run(net):
        return _trajectory(net, contract, sampler, n, steps, guidance, seed)

    x0, plan, w = reference_run or run(reference)
    want = finisher(contract, decoders and decoders[0])(x0)
    try:
        images = [want, finisher(contract, decoders and decoders[1])(run(candidate)[0])]
    except Exception as e:  # noqa: BLE001 - a candidate that cannot even run fails the check, in one line
        problem = f"{type(e).__name__}: {reason(e)}"
        return TrajectoryCheck(False, n, plan.steps, w, 255, want.size, [], sampler, problem)
    diff = np.abs(images[0].astype(np.int16) - images[1].astype(np.int16))
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return TrajectoryCheck(bool(diff.max() <= tol.max_levels), n, plan.steps, w, int(diff.max()),
                           int((diff > 0).sum()), [int(v) for v in worst], sampler)


def verify_backend(name: str, reference: NumpyNet, candidate: NumpyNet, contract: SamplingContract,
                   precision: str = "fp32", *, per_call: bool = True, trajectory_candidate: NumpyNet | None = None,
                   settings: dict | None = None,
                   decoders: tuple[Callable, Callable] | None = None) -> BackendResult:
    """Run the checks for one backend; reduced-precision backends (no per-call bound) get the trajectory check only.

    ``trajectory_candidate`` runs the trajectory where it must differ from the per-call candidate (the same model
    with the settings generation uses, e.g. TF32 on); ``settings`` records which settings each check ran with;
    ``decoders``: a latent model's (the eager one, the backend's ``decode``), checked per call and ending both
    trajectories.
    """
    tol = TOLERANCES[precision]
    exact = per_call and tol.atol is not None
    eps = check_eps(reference, candidate, contract, tol) if exact else None
    ddpm = _trajectory(reference, contract, _DDPM, 4, 20, None, 0)  # check_trajectory's defaults; run once for both
    dec = check_decoder(ddpm[0], *decoders, contract, tol) if exact and decoders else None
    traj = check_trajectory(reference, trajectory_candidate or candidate, contract, tol, decoders=decoders,
                            reference_run=ddpm)
    multi = check_trajectory(reference, trajectory_candidate or candidate, contract, tol, steps=10,
                             sampler=MULTISTEP_CHECK, decoders=decoders)
    passed = all(c is None or c.passed for c in (eps, dec)) and traj.passed and multi.passed
    return BackendResult(name, passed, eps, dec, traj, multi, settings)


def torch_net(module, device: str = "cpu", contract: SamplingContract | None = None) -> NumpyNet:
    """A numpy ``net(x, t, y)`` around a torch module (eager or TorchScript), no grad, on ``device``: its prediction
    channels where ``contract`` says which they are."""
    if contract is None or contract.prediction_channels is None:
        return lambda x, t, y: call_torch(module, device, x, t, y)
    return lambda x, t, y: predicted(call_torch(module, device, x, t, y), contract)


def torch_decoder(module, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A numpy ``decode(z)`` around a torch decoder module, no grad, on ``device``."""
    import torch

    def decode(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(z, np.float32)).to(device)).float().cpu().numpy()

    return decode
