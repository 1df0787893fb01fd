"""Activation offloading (`--activation-offloading`): the tensors autograd saves for the backward
pass go to pinned host memory during the forward and come back during the backward.

One `ActivationOffload` is entered around each micro-batch's forward and backward; inside it,
`torch.autograd.graph.saved_tensors_hooks` sees every tensor an op saves:

- **pack** (forward): a tensor that qualifies (`_offloadable`) is taken over a whole storage at a
  time: copied to pinned host memory on a side CUDA stream, which first waits for the compute stream
  (so it copies finished values) and then runs beside it. The device block is held in a stash of
  the last IN_FLIGHT storages; one leaving the stash is freed after the compute stream has waited
  for its copy's event, so the caching allocator may hand the block straight to the next compute
  kernel (freed with `record_stream` instead, a block could be reused only once the host had seen
  the copy finish, and with the host running ahead the blocks would pile up). The stash bounds the
  device memory held by copies in flight; when the link is slower than compute, the compute stream
  waits for it. A storage saved again (the normed hidden states that q, k, v and LoRA's A read, the
  cos/sin every layer reads) is copied once: each save keeps (dtype, size, stride, offset) and comes
  back as a view of the one copy.
- **unpack** (backward): a storage still in the stash (the last ones saved) is used where it is;
  any other comes back from the host, on the compute stream after its copy out, unless prefetched:
  each unpack starts bringing back the PREFETCH storages saved before it (into a buffer of the
  compute stream, on the side stream after it, with an event the compute stream waits for). A
  storage's device bytes are dropped after its last save is unpacked.
- **kept where they are**: parameters (an `nn.Parameter`, a view of one, or any tensor on the
  storage of a parameter of a module called inside the context: FSDP2's gathered weights too),
  leaves that require grad (their owner holds them anyway), tensors on another device, tensor
  subclasses and non-strided layouts, and storages under `min_bytes` (MIN_BYTES, 1 MiB: the copy
  would cost more than it frees). Autocast's low-precision copies of the weights are not parameters:
  they exist only for the backward, and are offloaded like activations.

With gradient checkpointing (non-reentrant), the checkpoint's own hooks, nested inside these, take
what the checkpointed layers save (it is recomputed in the backward, under the checkpoint's hooks
again); what reaches this module from a checkpointed layer is its inputs, which the checkpoint saves
for the recomputation: only the checkpoint boundaries are offloaded. The hooks (and the module
pre-hook that notes the parameters) exist only inside the context.

On the CPU the tensors are already in host memory: the same bookkeeping runs (pack, stash, dedupe,
unpack, prefetch, the counts in `stats`) with each storage kept by reference, no copy (`copy=True`
copies anyway: the tests use it to prove the storage-and-view round trip).

What stays on the device, for a memory model (N decoder layers, A = one layer's saved storages over
MIN_BYTES, H = one hidden state (B, T, hidden), the input a checkpointed layer saves):

- without checkpointing: the saved tensors under MIN_BYTES and the parameters' own saves; of the
  rest, at most IN_FLIGHT + PREFETCH + 1 storages at a time (the stash, what is prefetched, what
  is in use): a fraction of A, instead of N x A.
- with checkpointing: the layer being recomputed holds its whole A (its saves never reach these
  hooks), plus at most IN_FLIGHT + PREFETCH + 1 boundaries: A + 7H instead of A + N x H.
- host: a micro-batch's offloaded bytes, pinned (the caching host allocator rounds each block up
  to a power of two: up to 2x), cached from step to step.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from typing import NamedTuple

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

MIN_BYTES = 1 << 20  # storages smaller than this stay on the device
IN_FLIGHT = 4  # storages whose device block is held until its copy out is done (TRL keeps 5)
PREFETCH = 2  # storages brought back ahead of the one the backward is unpacking


def for_config(cfg, device, **options):
    """A reusable context manager around one micro-batch's forward and backward: an
    ActivationOffload (`options` go to it) if cfg.activation_offloading, else a no-op."""
    if not cfg.activation_offloading:
        return contextlib.nullcontext()
    return ActivationOffload(device, **options)


class _Stored:
    """One storage taken over by pack: its bytes on the host, and on the device while the original
    block is stashed or once brought back; `prev` is the storage taken just before it (the order
    prefetch walks)."""

    __slots__ = ("source", "nbytes", "host", "ready", "on_device", "original", "fetched", "pending",
                 "prev")

    def __init__(self, storage, nbytes: int, prev: _Stored | None):
        self.source = weakref.ref(storage)  # dedupe while the original lives, never after
        self.nbytes = nbytes
        self.host = self.ready = self.on_device = self.fetched = None
        self.original = False  # on_device is the original block, which the copy out may still read
        self.pending = 1  # saves of this storage not yet unpacked
        self.prev = prev


class _Saved(NamedTuple):
    """What autograd holds for one offloaded save: a view of a stored storage."""

    stored: _Stored
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _as_bytes(storage) -> torch.Tensor:
    """The whole storage as a 1-D uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class ActivationOffload:
    """Saved activations to host memory and back (module docstring). Reusable, not re-entrant.

    Args:
        device: the training device; only tensors on it are offloaded.
        min_bytes: storages smaller than this stay where they are.
        in_flight: storages whose device block is held until its copy out is done (>= 1).
        prefetch: storages brought back ahead of the one being unpacked.
        copy: copy to a new host buffer even on the CPU (default: only on CUDA).
    """

    def __init__(self, device, min_bytes: int = MIN_BYTES, in_flight: int = IN_FLIGHT,
                 prefetch: int = PREFETCH, copy: bool | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"activation offloading runs on CUDA or the CPU, not {self.device}")
        if min_bytes < 0 or in_flight < 1 or prefetch < 0:
            raise ValueError(f"need min_bytes >= 0, in_flight >= 1, prefetch >= 0; got {min_bytes}, "
                             f"{in_flight}, {prefetch}")
        self.min_bytes, self.in_flight, self.prefetch = min_bytes, in_flight, prefetch
        self.cuda = self.device.type == "cuda"
        self.copy = self.cuda or bool(copy)
        self.stats = dict.fromkeys(("packed", "kept", "offloaded", "deduped", "unpacked",
                                    "prefetched", "offloaded_bytes"), 0)
        self._stream = None
        self._active = None

    # -- the context -----------------------------------------------------------------------------
    def __enter__(self):
        if self._active is not None:
            raise RuntimeError("ActivationOffload is already active (it is not re-entrant)")
        if self.cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._taken: dict[int, _Stored] = {}  # id(storage) -> this context's copy of it
        self._params: dict[int, weakref.ref] = {}  # id(storage) -> the parameter storage
        self._last: _Stored | None = None
        self._stash: collections.deque[_Stored] = collections.deque()  # originals, oldest first
        self._fetching: set[_Stored] = set()  # prefetched, not yet waited for by the compute stream
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        note = register_module_forward_pre_hook(self._note_params)
        hooks.__enter__()
        self._active = (hooks, note)
        return self

    def __exit__(self, *exc):
        hooks, note = self._active
        self._active = None
        hooks.__exit__(*exc)
        note.remove()
        # Every device block the side stream may still touch is waited for by the compute stream
        # before it can be freed; what autograd still holds lives on in its _Saved handles.
        while self._stash:
            self._release(self._stash.popleft())
        for stored in self._fetching:
            self._wait(stored.fetched)
            stored.fetched = None
        self._taken, self._params, self._last, self._fetching = {}, {}, None, set()
        return False

    def _note_params(self, module, args) -> None:
        """Module pre-hook: the storages of the parameters of every module called in the context
        (an op may save a parameter's storage under another tensor, e.g. a detached view)."""
        for p in module._parameters.values():
            if p is not None and type(p) is torch.nn.Parameter:
                st = p.untyped_storage()
                self._params[id(st)] = weakref.ref(st)

    def _wait(self, event) -> None:
        """The compute (current) stream waits for `event` of the side stream."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    # -- forward -------------------------------------------------------------------------------
    def _offloadable(self, t: torch.Tensor):
        """The storage of `t` if it is to be offloaded, else None."""
        if type(t) is not torch.Tensor or t.device != self.device:  # Parameter, DTensor, ...
            return None
        if t.layout != torch.strided or t.is_quantized or t.is_conj() or t.is_neg():
            return None  # set_ would not rebuild them
        root = t if t._base is None else t._base  # a view's base (a view inside a Function's
        if isinstance(root, torch.nn.Parameter) or (root.is_leaf and root.requires_grad):  # forward
            return None  # is a leaf that requires grad: its base says what it is)
        st = t.untyped_storage()
        if st.nbytes() < max(self.min_bytes, 1):
            return None
        known = self._params.get(id(st))
        return st if known is None or known() is not st else None

    def _pack(self, t: torch.Tensor):
        self.stats["packed"] += 1
        st = self._offloadable(t)
        if st is None:
            self.stats["kept"] += 1
            return t
        stored = self._taken.get(id(st))
        if stored is not None and stored.source() is st:
            stored.pending += 1
            self.stats["deduped"] += 1
        else:
            stored = self._take(st)
        return _Saved(stored, t.dtype, t.size(), t.stride(), t.storage_offset())

    def _take(self, st) -> _Stored:
        """The storage's bytes to the host (on the side stream on CUDA); the original block into
        the stash."""
        src = _as_bytes(st)
        stored = self._last = self._taken[id(st)] = _Stored(st, src.numel(), self._last)
        if self.cuda:
            side = self._stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                stored.host = torch.empty(stored.nbytes, dtype=torch.uint8, pin_memory=True)
                stored.host.copy_(src, non_blocking=True)
                stored.ready = side.record_event()
        else:
            stored.host = src.clone() if self.copy else src
        stored.on_device, stored.original = src, True
        self._stash.append(stored)
        while len(self._stash) > self.in_flight:
            self._release(self._stash.popleft())
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += stored.nbytes
        return stored

    def _release(self, stored: _Stored) -> None:
        """Let go of the original block, once the compute stream is past its copy out."""
        if stored.original:
            self._wait(stored.ready)
            stored.on_device, stored.original = None, False

    # -- backward ------------------------------------------------------------------------------
    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self.stats["unpacked"] += 1
        stored = saved.stored
        data = self._bring_back(stored)
        self._prefetch(stored.prev)
        stored.pending -= 1
        if stored.pending <= 0:  # the view returned keeps the bytes for as long as autograd needs
            if stored.original:
                self._release(stored)
            stored.on_device = None
        return torch.empty(0, dtype=saved.dtype, device=data.device).set_(
            data.untyped_storage(), saved.offset, saved.size, saved.stride)

    def _bring_back(self, stored: _Stored) -> torch.Tensor:
        """The stored bytes on the device, ready for the current (compute) stream."""
        if stored.on_device is not None:  # the original, or brought back already
            if stored.fetched is not None:
                self._wait(stored.fetched)
                stored.fetched = None
                self._fetching.discard(stored)
            return stored.on_device
        if self.cuda:  # not prefetched: now, on the compute stream
            self._wait(stored.ready)
            stored.on_device = stored.host.to(self.device, non_blocking=True)
        else:
            stored.on_device = stored.host.clone() if self.copy else stored.host
        return stored.on_device

    def _prefetch(self, stored: _Stored | None) -> None:
        """Start bringing back the next `prefetch` storages the backward still needs."""
        ahead = steps = 0
        side_waited = False
        # (bounded: a run of storages already unpacked is not walked to its end)
        while stored is not None and ahead < self.prefetch and steps < 8 * self.prefetch:
            steps += 1
            if stored.pending > 0:
                ahead += 1
                if stored.on_device is None:
                    self.stats["prefetched"] += 1
                    if self.cuda:
                        # A compute-stream buffer, written on the side stream once the compute
                        # stream is here (its block may have served a kernel queued before).
                        buf = torch.empty(stored.nbytes, dtype=torch.uint8, device=self.device)
                        if not side_waited:
                            self._stream.wait_stream(torch.cuda.current_stream(self.device))
                            side_waited = True
                        with torch.cuda.stream(self._stream):  # after its copy out, same stream
                            buf.copy_(stored.host, non_blocking=True)
                            stored.fetched = self._stream.record_event()
                        self._fetching.add(stored)
                        stored.on_device = buf
                    else:
                        stored.on_device = stored.host.clone() if self.copy else stored.host
            stored = stored.prev
