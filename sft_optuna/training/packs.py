"""Fused packs: several trials of one model shape trained as one model (HFTA's idea, with ``torch.func``).

Plain PyTorch; knows nothing of Optuna. Each member is a :class:`~sft_optuna.training.trainer.Trainer` on a
thread of its own, with its own data order, augmentation draws, mixing, learning-rate schedule, momentum,
weight decay, label smoothing and epochs. A member hands its batch in with :meth:`Member.step`; once every
member of its group has handed one in, one of their threads runs a single fused step for all of them: the
members' weights stacked along a new first dimension, ``vmap`` over ``functional_call`` for the forward pass,
one backward pass (each member's loss depends only on its own slice, so the summed loss gives each its own
gradient), and a per-member SGD or AdamW update on the stacked tensors. Members whose configurations cannot be
fused (:func:`pack_key`) train in a group of their own.

The stacked weights are the truth while a group steps; a member's own module is brought up to date at the end
of each of its passes (:meth:`Member.sync`), so that its evaluation, checkpoint and ``state_dict`` are exactly
those of a trainer of its own. Groups change only at step boundaries: a member that joins or leaves makes the
group restack before its next step.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from sft_optuna.config import ModelConfig, TrainConfig
from sft_optuna.training.model import train_mode

if TYPE_CHECKING:
    from sft_optuna.training.trainer import Trainer

__all__ = ["Member", "Pack", "PackAborted", "pack_key"]

log = logging.getLogger(__name__)


class PackAborted(KeyboardInterrupt):
    """The worker was told to stop now (a second Ctrl-C): every member's step raises this."""


def pack_key(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Hashable | None:
    """What the members of one fused group share — the model's shape, the batch's shape, the optimizer's kind
    and the step's precision and BatchNorm mode; None for a configuration that trains alone: a compiled model,
    a linear-probe phase (``freeze_epochs``: which weights train changes between epochs), or an EMA of the
    weights (updated after every step, outside the fused model)."""
    if train_cfg.compile or train_cfg.freeze_epochs > 0 or train_cfg.ema_decay > 0:
        return None
    return (
        model_cfg,
        train_cfg.batch_size,
        train_cfg.optimizer,
        train_cfg.bn,
        train_cfg.precision,
        train_cfg.channels_last,
        train_cfg.head_dropout,  # the template's dropout hook carries its rate
    )


@dataclass
class _Request:
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float
    result: tuple[torch.Tensor, torch.Tensor] | None = None
    error: BaseException | None = None


@dataclass
class _Stack:
    """A group's members' weights, buffers and optimizer state, stacked in member order."""

    members: tuple[Member, ...]
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    steps: torch.Tensor  # AdamW's per-member step counts (float)
    groups: list[int]  # param-group index of each parameter, in ``params`` order


@dataclass
class _Group:
    key: Hashable
    template: nn.Module  # the architecture on the meta device: functional_call's skeleton
    members: list[Member] = field(default_factory=list)
    pending: dict[int, _Request] = field(default_factory=dict)  # id(member) -> its request
    busy: bool = False
    stack: _Stack | None = None
    max_fused: int | None = None  # members per fused step after one ran out of device memory (None: all)


def _lr_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-member values [K] shaped to broadcast over a stacked tensor [K, ...]."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class Member:
    """One trainer's place in a :class:`Pack`."""

    def __init__(self, pack: Pack, group: _Group, trainer: Trainer) -> None:
        self.pack = pack
        self.group = group
        self.trainer = trainer

    def step(
        self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on this batch as part of the group's next fused step; returns (loss, logits), as an eager step
        of this trainer would."""
        return self.pack._step(self, _Request(x, y_a, y_b, lam))

    def sync(self) -> None:
        """Bring the trainer's own module and optimizer state up to date (end of its pass)."""
        self.pack._sync(self)

    def leave(self) -> None:
        """The trainer is done (or failed): the others go on without it."""
        self.pack._leave(self)


class Pack:
    """Fused groups of members, one group per :func:`pack_key`; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._groups: dict[Hashable, _Group] = {}
        self._aborted = False
        self.init_lock = threading.Lock()
        """Held while a member's trainer seeds torch's global generator and initialises its model."""
        self._shared: dict[Hashable, Any] = {}
        self.fused_steps = 0
        """Fused steps run so far (one per group step, whatever its number of members)."""
        self.member_steps = 0
        """Training steps of members so far: ``member_steps / fused_steps`` trials trained per step on average."""

    def shared(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """One object per ``key`` for all members (the data pipelines: one copy of the splits, not K)."""
        with self._cond:
            if key not in self._shared:
                self._shared[key] = make()
            return self._shared[key]

    def join(self, trainer: Trainer, key: Hashable) -> Member:
        """Add ``trainer`` to the group of ``key`` (made on first use)."""
        with self._cond:
            group = self._groups.get(key)
            if group is None:
                template = copy.deepcopy(trainer.model).to("meta")
                group = self._groups[key] = _Group(key, template)
            member = Member(self, group, trainer)
            group.members.append(member)
            return member

    @property
    def aborted(self) -> bool:
        """Was :meth:`abort` called?"""
        return self._aborted

    def abort(self) -> None:
        """Stop now: every waiting and future step raises :class:`PackAborted`."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def size(self) -> int:
        """Members training now, over all groups."""
        with self._cond:
            return sum(len(g.members) for g in self._groups.values())

    # -- the protocol: every call below holds the condition's lock except the fused step itself --

    def _leave(self, member: Member) -> None:
        with self._cond:
            group = member.group
            if member in group.members:
                group.members.remove(member)
                group.pending.pop(id(member), None)
            if not group.members and self._groups.get(group.key) is group:
                del self._groups[group.key]
            self._cond.notify_all()  # the others may all be waiting for a step now

    def _sync(self, member: Member) -> None:
        with self._cond:
            stack = member.group.stack
            if stack is not None and member in stack.members:
                _write_back(stack, stack.members.index(member))

    def _step(self, member: Member, request: _Request) -> tuple[torch.Tensor, torch.Tensor]:
        group = member.group
        with self._cond:
            if self._aborted:
                raise PackAborted("stopped now")
            group.pending[id(member)] = request
            while True:
                if request.error is not None:
                    raise request.error
                if request.result is not None:
                    return request.result
                if self._aborted:
                    group.pending.pop(id(member), None)
                    raise PackAborted("stopped now")
                if not group.busy and group.members and len(group.pending) == len(group.members):
                    break  # everyone has handed in a batch: this thread runs the step
                self._cond.wait()
            group.busy = True  # no other step of this group, no sync and no leave of its members until False
            requests = [group.pending.pop(id(m)) for m in group.members]
            members = tuple(group.members)
        error: BaseException | None = None
        try:
            if group.stack is None or group.stack.members != members:
                _restack(group, members)
            results = _fused_step(group, members, requests)
        except BaseException as exc:  # noqa: BLE001 - every member of the step gets it, as its own step would
            error = exc
        with self._cond:
            self.fused_steps += 1
            self.member_steps += len(requests)
            for i, r in enumerate(requests):
                if error is not None:
                    r.error = error
                else:
                    r.result = results[i]
            group.busy = False
            if error is not None:
                # half-updated: every member of the step gets the error and ends; the others restack from
                # their own modules
                group.stack = None
            self._cond.notify_all()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result


def _restack(group: _Group, members: tuple[Member, ...]) -> None:
    """Write the old stack back to the members still in it, then stack the current members."""
    old = group.stack
    if old is not None:
        for i, m in enumerate(old.members):
            if m in members:
                _write_back(old, i)
    first = members[0].trainer
    names = [n for n, _ in first.model.named_parameters()]
    owner = {id(p): g for g, pg in enumerate(first.optimizer.param_groups) for p in pg["params"]}
    groups = [owner[id(p)] for p in first.model.parameters()]
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    adamw = first.cfg.optimizer == "adamw"
    slots = ("exp_avg", "exp_avg_sq") if adamw else ("momentum_buffer",)
    steps = []
    for m in members:
        st = m.trainer.optimizer.state
        p0 = next(iter(m.trainer.model.parameters()))
        steps.append(float(st.get(p0, {}).get("step", 0.0)))
    member_params = [list(m.trainer.model.named_parameters()) for m in members]
    for i, name in enumerate(names):
        tensors = [mp[i][1] for mp in member_params]
        params[name] = torch.stack([t.detach() for t in tensors]).requires_grad_(True)
        state[name] = {}
        for slot in slots:
            values = []
            for m, t in zip(members, tensors, strict=True):
                v = m.trainer.optimizer.state.get(t, {}).get(slot)
                values.append(torch.zeros_like(t) if v is None else v)
            state[name][slot] = torch.stack(values)
    member_buffers = [dict(m.trainer.model.named_buffers()) for m in members]
    buffers = {name: torch.stack([mb[name] for mb in member_buffers]) for name, _ in first.model.named_buffers()}
    device = params[names[0]].device
    group.stack = _Stack(members, params, buffers, state, torch.tensor(steps, device=device), groups)


@torch.no_grad()
def _write_back(stack: _Stack, i: int) -> None:
    """Member ``i``'s slice of the stack -> its own module and optimizer state."""
    trainer = stack.members[i].trainer
    adamw = trainer.cfg.optimizer == "adamw"
    momentum = trainer.cfg.momentum
    for (name, p), slot in zip(trainer.model.named_parameters(), stack.params.values(), strict=True):
        p.copy_(slot[i])
        entry = trainer.optimizer.state[p]
        if adamw:
            entry["exp_avg"] = stack.state[name]["exp_avg"][i].clone()
            entry["exp_avg_sq"] = stack.state[name]["exp_avg_sq"][i].clone()
            entry["step"] = stack.steps[i].detach().to("cpu", torch.float32).clone()
        elif momentum != 0:
            entry["momentum_buffer"] = stack.state[name]["momentum_buffer"][i].clone()
    for name, b in trainer.model.named_buffers():
        b.copy_(stack.buffers[name][i])


def _fused_step(
    group: _Group, members: tuple[Member, ...], requests: list[_Request]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One training step of every member at once; returns each one's (loss, logits).

    A step that runs out of device memory is taken again in halves (then quarters, ...) of the members — the
    same arithmetic, member by member, only less of it at once — and the group keeps that size; only a single
    member's step that does not fit raises (as a trainer of its own's would). The BatchNorm statistics a failed
    attempt had already moved are put back first; the weights are updated only once every part has its
    gradients."""
    stack = group.stack
    assert stack is not None
    cfg0 = members[0].trainer.cfg
    device = requests[0].x.device
    train_mode(group.template, cfg0.bn)
    dtype = next(iter(stack.params.values())).dtype  # float32; a test trains in float64
    inputs = (
        torch.stack([r.x for r in requests]).to(dtype),
        torch.stack([r.y_a for r in requests]),
        torch.stack([r.y_b for r in requests]),
        # the loss's weights in float64 (as the Python floats of a trainer of its own), cast where they are used
        torch.tensor([r.lam for r in requests], device=device, dtype=torch.float64),
        torch.tensor([m.trainer.cfg.label_smoothing for m in members], device=device, dtype=torch.float64),
    )
    n = len(members)
    while True:
        size = min(group.max_fused or n, n)
        before = {k: b.clone() for k, b in stack.buffers.items()}
        try:
            parts = [_gradients(group, stack, inputs, start, min(start + size, n)) for start in range(0, n, size)]
            break
        except torch.cuda.OutOfMemoryError:
            for k, b in stack.buffers.items():
                b.copy_(before[k])
            del before
            if size == 1:
                raise
            group.max_fused = size // 2
            log.warning(
                "a fused step of %d trials did not fit in device memory: stepping %d at a time", size, size // 2
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if len(parts) == 1:
        grads, loss, logits = parts[0]
    else:
        grads = tuple(torch.cat([part[0][i] for part in parts]) for i in range(len(stack.params)))
        loss = torch.cat([part[1] for part in parts])
        logits = torch.cat([part[2] for part in parts])
    _update(stack, members, list(stack.params.values()), grads)
    return [(loss[i], logits[i]) for i in range(n)]


def _gradients(
    group: _Group, stack: _Stack, inputs: tuple[torch.Tensor, ...], start: int, stop: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """(gradients, losses, logits) of members ``start:stop`` of the stack; their BatchNorm statistics move."""
    from sft_optuna.training.trainer import _autocast

    template = group.template
    whole = start == 0 and stop == len(stack.members)
    # the stack's own leaves, or leaves viewing a slice of them (the buffers' slices are updated in place)
    params = (
        stack.params if whole else {k: p[start:stop].detach().requires_grad_(True) for k, p in stack.params.items()}
    )
    buffers = stack.buffers if whole else {k: b[start:stop] for k, b in stack.buffers.items()}
    x, y_a, y_b, lam, eps = (t[start:stop] for t in inputs)

    def loss_of(
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        xb: torch.Tensor,
        ya: torch.Tensor,
        yb: torch.Tensor,
        lam_k: torch.Tensor,
        eps_k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(template, (params, buffers), (xb,))
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        smooth = -logp.mean(dim=-1)

        def ce(y: torch.Tensor) -> torch.Tensor:
            nll = -logp.gather(1, y[:, None]).squeeze(1)
            return ((1.0 - eps_k) * nll + eps_k * smooth).mean()

        return lam_k * ce(ya) + (1.0 - lam_k) * ce(yb), logits

    cfg0 = stack.members[0].trainer.cfg
    with _autocast(x.device, cfg0.precision):
        loss, logits = vmap(loss_of, randomness="different")(params, buffers, x, y_a, y_b, lam, eps)
    grads = torch.autograd.grad(loss.sum(), list(params.values()))
    return grads, loss.detach(), logits.detach()


@torch.no_grad()
def _update(
    stack: _Stack, members: tuple[Member, ...], params: list[torch.Tensor], grads: tuple[torch.Tensor, ...]
) -> None:
    """Each member's own optimizer step on its slice: SGD (momentum, nesterov, weight decay) as
    ``torch.optim.SGD`` computes it, or AdamW as ``torch.optim.AdamW``, with each member's rates."""
    device = params[0].device
    # [member, param group], built on the host and copied to the device once per step
    lr_host = torch.tensor(
        [[float(g["lr"]) for g in m.trainer.optimizer.param_groups] for m in members], dtype=torch.float64
    )
    wd_host = torch.tensor(
        [[float(g["weight_decay"]) for g in m.trainer.optimizer.param_groups] for m in members],
        dtype=torch.float64,
    )
    decays = (wd_host != 0).any(dim=0).tolist()  # per param group, read on the host: no device sync per tensor
    lr, wd = lr_host.to(device), wd_host.to(device)
    mom = torch.tensor([m.trainer.cfg.momentum for m in members], dtype=torch.float64, device=device)
    states = list(stack.state.values())
    if members[0].trainer.cfg.optimizer == "adamw":
        stack.steps += 1
        bc1 = 1 - mom ** stack.steps.double()
        bc2 = 1 - 0.999 ** stack.steps.double()
        for p, g, st, gi in zip(params, grads, states, stack.groups, strict=True):
            lr_g, wd_g = lr[:, gi], wd[:, gi]
            p.mul_(_lr_view(1 - lr_g * wd_g, p))
            st["exp_avg"].lerp_(g, _lr_view(1 - mom, p))
            st["exp_avg_sq"].mul_(0.999).addcmul_(g, g, value=1 - 0.999)
            denom = (st["exp_avg_sq"].sqrt() / _lr_view(bc2.sqrt(), p)).add_(1e-8)
            p.addcdiv_(st["exp_avg"] * _lr_view(-(lr_g / bc1), p), denom)
        return
    # the same operations as torch.optim.SGD's (x.add(y, alpha=a) as addcmul with a per-member tensor), so that a
    # member's weights follow a trainer of its own's to the last bits on the CPU
    nesterov = torch.tensor([m.trainer.cfg.nesterov and m.trainer.cfg.momentum > 0 for m in members], device=device)
    for p, g, st, gi in zip(params, grads, states, stack.groups, strict=True):
        lr_g, wd_g = lr[:, gi], wd[:, gi]
        d_p = torch.addcmul(g, p, _lr_view(wd_g, p)) if decays[gi] else g
        buf = st["momentum_buffer"]
        buf.mul_(_lr_view(mom, p)).add_(d_p)
        step = torch.where(nesterov.view(-1, *([1] * (p.dim() - 1))), torch.addcmul(d_p, buf, _lr_view(mom, p)), buf)
        p.addcmul_(step, _lr_view(-lr_g, p))
