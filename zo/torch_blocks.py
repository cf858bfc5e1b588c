"""The ``torch-blocks`` direction generator: the platform's generator in fixed blocks.

Element ``j`` of tensor ``i`` at step seed ``s`` is element ``j % TORCH_BLOCK`` of a block
drawn by a ``torch.Generator`` on the tensor's device seeded with ``mix_seed(s, i, j //
TORCH_BLOCK)`` (``normal_``, or random bytes as 8 signs each for rademacher). On CPU that is
mt19937, the fastest gaussian measured there; a range costs its whole blocks, and the
per-block seeding makes it addressable by global coordinates as philox is.
"""

from __future__ import annotations

import threading

import torch

from zo.direction_base import DirectionGenerator, Job, add_scaled, mix_state, run_jobs, splitmix64

TORCH_BLOCK = 1 << 14
"""Elements per seeded block of ``torch-blocks``: part of its definition (changing it changes
every direction). Small enough that an embedding's rows cost few blocks, large enough that
seeding (~2 us) is noise next to drawing (~80 us)."""

_SIGNS = torch.tensor(
    [[1.0 - 2.0 * ((byte >> bit) & 1) for bit in range(8)] for byte in range(256)]
)
"""The 8 signs a random byte stands for: rademacher at one generator call per 8 elements."""


class TorchBlockGenerator(DirectionGenerator):
    name = "torch-blocks"
    block = TORCH_BLOCK

    def __init__(self, distribution: str = "gaussian", threads: int = 1):
        super().__init__(distribution, threads)
        self._local = threading.local()

    def _generator(self, device: torch.device) -> torch.Generator:
        generators = self._local.__dict__.setdefault("generators", {})
        if device not in generators:  # creating a CUDA generator per block is slow
            generators[device] = torch.Generator(device=device)
        return generators[device]

    def draw_block(self, out: torch.Tensor, seed: int, index: int, block: int) -> None:
        """The first ``out.numel()`` values of block ``block``: on CPU any multiple of 16 (a
        prefix of ``normal_`` equals the whole draw's prefix there), the whole block on CUDA
        (whose kernel maps elements to threads by the tensor's length)."""
        self._draw(out, mix_state((seed, index, block)) >> 1)

    def _draw(self, out: torch.Tensor, block_seed: int) -> None:
        generator = self._generator(out.device)
        generator.manual_seed(block_seed)
        if self.distribution == "gaussian":
            out.normal_(generator=generator)
            return
        bytes_ = self._bytes(out.numel() // 8, out.device)
        bytes_.random_(0, 256, generator=generator)  # one generator call per 8 elements
        torch.index_select(self._signs(out.device), 0, bytes_, out=out.view(-1, 8))

    def _bytes(self, count: int, device: torch.device) -> torch.Tensor:
        """This thread's buffer of random bytes (int32: index_select's index type)."""
        buffers = self._local.__dict__.setdefault("bytes", {})
        if device not in buffers:
            buffers[device] = torch.empty(TORCH_BLOCK // 8, dtype=torch.int32, device=device)
        return buffers[device][:count]

    def _signs(self, device: torch.device) -> torch.Tensor:
        tables = self._local.__dict__.setdefault("signs", {})
        if device not in tables:
            tables[device] = _SIGNS.to(device)
        return tables[device]

    def _length(self, needed: int, device: torch.device) -> int:
        if device.type != "cpu":
            return TORCH_BLOCK
        return min(TORCH_BLOCK, -(-needed // 16) * 16)

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        stop = start + out.numel()
        position = start
        if start % TORCH_BLOCK == 0 and self.distribution == "gaussian":
            # the hot path (whole blocks): one hash and two calls per block
            prefix = mix_state((seed, index))
            generator = self._generator(out.device)
            first = start // TORCH_BLOCK
            for block in range(out.numel() // TORCH_BLOCK):
                generator.manual_seed(splitmix64(prefix ^ (first + block)) >> 1)
                out[block * TORCH_BLOCK : (block + 1) * TORCH_BLOCK].normal_(generator=generator)
            position = start + out.numel() // TORCH_BLOCK * TORCH_BLOCK
        while position < stop:
            block, within = divmod(position, TORCH_BLOCK)
            take = min(TORCH_BLOCK - within, stop - position)
            length = self._length(within + take, out.device)
            piece = out[position - start : position - start + take]
            if within == 0 and take == length:
                self.draw_block(piece, seed, index, block)
            else:
                buffer = self._block_buffer(out.device)[:length]
                self.draw_block(buffer, seed, index, block)
                piece.copy_(buffer[within : within + take])
            position += take

    def _block_buffer(self, device: torch.device) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        if device not in buffers:
            buffers[device] = torch.empty(TORCH_BLOCK, dtype=torch.float32, device=device)
        return buffers[device]

    def job_size(self) -> int:
        return TORCH_BLOCK * 64

    def rows_add(self, out, ids, seed, index, shape, scale) -> None:
        row = shape[1]
        flat_ids = ids.reshape(-1).to(torch.int64)
        if flat_ids.numel() == 0:
            return
        if ids.device.type == "cpu":
            add_scaled(out, self._rows_cpu(flat_ids, seed, index, row), scale)
            return
        # On a GPU, choosing blocks by token would read the ids on the host: every block of
        # the tensor is drawn instead, 64 at a time, and the rows gathered under masks.
        offsets = flat_ids.unsqueeze(1) * row + torch.arange(row, device=ids.device)
        total = -(-shape[0] * row // TORCH_BLOCK)
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        group = 64
        for first in range(0, total, group):
            count = min(group, total - first)
            drawn = torch.empty(count, TORCH_BLOCK, device=out.device)
            for position in range(count):
                self.draw_block(drawn[position], seed, index, first + position)
            local = offsets - first * TORCH_BLOCK
            hit = (local >= 0) & (local < count * TORCH_BLOCK)
            picked = drawn.view(-1)[local.clamp(0, count * TORCH_BLOCK - 1)]
            acc.add_(torch.where(hit, picked, 0.0))
        add_scaled(out, acc, scale)

    def _rows_cpu(self, flat_ids, seed, index, row) -> torch.Tensor:
        """The batch's rows, drawing only the blocks they touch, each once (reading the ids
        is no device sync on a CPU). Memory: the distinct rows and a block per thread."""
        tokens = flat_ids.tolist()
        distinct = sorted(set(tokens))
        position = {token: p for p, token in enumerate(distinct)}
        values = torch.empty(len(distinct), row)
        per_job = -(-len(distinct) // max(1, self.threads))
        run_jobs(
            [
                _rows_job(self, values, distinct, (first, first + per_job), seed, index, row)
                for first in range(0, len(distinct), per_job)
            ],
            self.threads,
        )
        return values[torch.tensor([position[token] for token in tokens])]


def _rows_job(generator, values, distinct, span, seed, index, row) -> Job:
    """Rows ``distinct[span]`` (sorted) into ``values``: blocks drawn in order, each once."""

    def job() -> None:
        blocks: dict[int, torch.Tensor] = {}
        for slot in range(*span):
            if slot >= len(distinct):
                return
            start = distinct[slot] * row
            stop = start + row
            for block in range(start // TORCH_BLOCK, (stop - 1) // TORCH_BLOCK + 1):
                if block not in blocks:
                    blocks = {b: t for b, t in blocks.items() if b >= start // TORCH_BLOCK}
                    blocks[block] = torch.empty(TORCH_BLOCK)
                    generator.draw_block(blocks[block], seed, index, block)
                first = max(start, block * TORCH_BLOCK)
                last = min(stop, (block + 1) * TORCH_BLOCK)
                values[slot, first - start : last - start] = blocks[block][
                    first - block * TORCH_BLOCK : last - block * TORCH_BLOCK
                ]

    return job
