"""Block-streamed offload: transformer blocks live in pinned host memory and visit the GPU one at a time.

Each streamed block's parameters and buffers are packed into one pinned host buffer. The GPU holds `num_slots`
flat buffers ("slots"), each as large as the largest streamed block. While block i runs on the compute stream,
the next streamed block is copied host -> device into the next slot on a side stream, so copy and compute overlap;
a block's compute waits for its copy (an event), and a copy into a slot waits until the compute of the slot's
previous tenant is finished (another event). The first `resident_bytes` of block weights (in model order) stay on
the GPU and are not streamed: that is the knob between memory and speed.

Invariant: outside its own forward, a streamed block's tensors point at its pinned host copy, so
`state_dict()`, `.to()` and friends see the real weights; during its forward they point into its slot.

Mechanism: the model's forward iterates `self.double_blocks` / `self.single_blocks` (house style P3). Those two
ModuleLists are given an `__iter__` that loads each block before yielding it and releases it after, so nothing
is hooked into the blocks themselves and per-block `torch.compile` keeps working. Everything outside the blocks
(embedders, modulation, final layer) is moved to the device and stays there.

Inference only: the backward pass would read weights whose slot was reused. On a CPU "device" the same
bookkeeping runs with synchronous copies (used by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

_ALIGN = 256  # bytes: every tensor starts at a 256-byte boundary inside a packed buffer


@dataclass
class _Entry:
    module: nn.Module
    name: str  # key in module._parameters or module._buffers
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


def _tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool, Tensor]]:
    seen: set[int] = set()
    out = []
    for module in block.modules():
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in store.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append((module, name, is_param, t))
    return out


def _view(flat: Tensor, e: _Entry) -> Tensor:
    return flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)


def _point(entries: list[_Entry], flat: Tensor) -> None:
    """Make every tensor of a block a view into `flat` (its host copy or a device slot)."""
    for e in entries:
        store = e.module._parameters if e.is_param else e.module._buffers
        store[e.name].data = _view(flat, e)


class _StreamedBlocks(nn.ModuleList):
    """A ModuleList whose iteration loads and releases each block through its `BlockOffload`."""

    _offload: BlockOffload

    def __iter__(self):
        for block in self._modules.values():
            self._offload.before(block)
            try:
                yield block
            finally:
                self._offload.after(block)


class BlockOffload:
    """Streams `model.double_blocks` and `model.single_blocks`; `remove()` puts everything back on the device."""

    def __init__(
        self, model: nn.Module, device: torch.device | str, resident_bytes: int = 0, num_slots: int = 2
    ):
        if num_slots < 2:
            raise ValueError("num_slots must be >= 2 (one block computes while the next one copies)")
        self.model, self.device, self.num_slots = model, torch.device(device), num_slots
        self.cuda = self.device.type == "cuda"
        self.lists = [model.double_blocks, model.single_blocks]
        blocks = [b for lst in self.lists for b in lst._modules.values()]
        in_blocks = {id(t) for b in blocks for *_, t in _tensors(b)}
        # Everything outside the blocks goes to the device for good.
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for t in store.values():
                    if t is not None and id(t) not in in_blocks and t.device != self.device:
                        t.data = t.data.to(self.device)

        self.streamed: list[nn.Module] = []  # model order
        self.entries: dict[int, list[_Entry]] = {}  # id(block) -> layout
        self.host: dict[int, Tensor] = {}  # id(block) -> packed (pinned) host buffer
        kept = 0
        for block in blocks:
            tensors = _tensors(block)
            size = sum(t.numel() * t.element_size() for *_, t in tensors)
            if kept + size <= resident_bytes:
                kept += size
                block.to(self.device)
                continue
            self._pack(block, tensors)
        self.resident_bytes = kept
        self.slot_bytes = max((self.host[id(b)].numel() for b in self.streamed), default=0)
        self.slots = [
            torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_slots)
        ]
        self.index = {id(b): i for i, b in enumerate(self.streamed)}  # id(block) -> streamed index
        self.slot_owner: list[int | None] = [None] * num_slots  # streamed index whose bytes sit in the slot
        self.ready: dict[int, torch.cuda.Event | None] = {}  # streamed index -> copy-done event
        self.free: list[torch.cuda.Event | None] = [None] * num_slots  # slot -> compute-done event
        self.in_use: int | None = None  # slot of the block being run
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.copies = 0  # host -> device block copies issued (for tests and reports)
        for lst in self.lists:
            lst.__class__ = _StreamedBlocks
            lst._offload = self

    @torch.no_grad()
    def _pack(self, block: nn.Module, tensors) -> None:
        entries, offset = [], 0
        for module, name, is_param, t in tensors:
            nbytes = t.numel() * t.element_size()
            entries.append(_Entry(module, name, is_param, offset, nbytes, t.dtype, t.shape))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        flat = torch.empty(offset, dtype=torch.uint8, pin_memory=self.cuda)
        for e, (*_, t) in zip(entries, tensors):
            _view(flat, e).copy_(t)
        _point(entries, flat)  # the device copies (if any) are freed here
        self.entries[id(block)] = entries
        self.host[id(block)] = flat
        self.streamed.append(block)

    # -- scheduling ------------------------------------------------------------------------------------------
    def _load(self, j: int) -> None:
        """Issue the copy of streamed block j into its slot (j mod num_slots), unless it is already there."""
        slot = j % self.num_slots
        if self.slot_owner[slot] == j or slot == self.in_use:
            # Already there, or the running block sits in that slot (a cyclic prefetch when the number of
            # streamed blocks is not a multiple of num_slots): it is loaded on demand at its turn instead.
            return
        src, dst = self.host[id(self.streamed[j])], self.slots[slot]
        if self.cuda:
            if self.free[slot] is not None:
                self.side.wait_event(self.free[slot])  # the previous tenant's compute is done
            with torch.cuda.stream(self.side):
                dst[: src.numel()].copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.side)
            self.ready[j] = event
        else:
            dst[: src.numel()].copy_(src)
            self.ready[j] = None
        self.slot_owner[slot] = j
        self.copies += 1

    def before(self, block: nn.Module) -> None:
        j = self.index.get(id(block))
        if j is not None:
            self._load(j)
            if self.cuda and self.ready[j] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[j])
            self.in_use = j % self.num_slots
            _point(self.entries[id(block)], self.slots[self.in_use])
            nxt = j + 1
        else:
            nxt = self._next_streamed_after(block)
        # Prefetch the next num_slots - 1 streamed blocks (cyclically: the last block prefetches the first one
        # for the next forward). Their slots' previous tenants were released before this block ran.
        n = len(self.streamed)
        for k in range(min(self.num_slots - 1, n - (j is not None))):
            self._load((nxt + k) % n)

    def after(self, block: nn.Module) -> None:
        j = self.index.get(id(block))
        if j is None:
            return
        slot = j % self.num_slots
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free[slot] = event
        self.in_use = None
        _point(self.entries[id(block)], self.host[id(block)])

    def _next_streamed_after(self, block: nn.Module) -> int:
        """Streamed index of the first streamed block after a resident `block` in model order (cyclic)."""
        order = [b for lst in self.lists for b in lst._modules.values()]
        pos = next(i for i, b in enumerate(order) if b is block)
        for b in order[pos + 1 :] + order[: pos + 1]:
            if id(b) in self.index:
                return self.index[id(b)]
        return 0

    @torch.no_grad()
    def remove(self) -> None:
        """Undo: every block back on the device, plain ModuleLists, slots and host buffers dropped."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for block in self.streamed:
            for e in self.entries[id(block)]:
                store = e.module._parameters if e.is_param else e.module._buffers
                store[e.name].data = store[e.name].data.to(self.device, copy=True)
        for lst in self.lists:
            lst.__class__ = nn.ModuleList
            del lst._offload
        self.streamed, self.entries, self.host, self.slots = [], {}, {}, []


def offload_blocks(
    model: nn.Module, device: torch.device | str = "cuda", resident_bytes: int = 0, num_slots: int = 2
) -> BlockOffload:
    """Stream the double/single blocks of a `Flux2` from pinned host memory to `device` (see the module doc).

    `resident_bytes`: block weights (in model order) allowed to stay on the device; 0 streams every block.
    """
    return BlockOffload(model, device, resident_bytes, num_slots)
