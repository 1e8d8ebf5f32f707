"""Lazy patch reading and the batched patch-embedding engine behind :func:`asign.pp.extract_features`.

Patches are read window by window from an image pyramid level (numpy or dask arrays, never loaded whole), padded with
white where they cross the image border, resized and embedded in batches by an :class:`~asign._encoders.Encoder`
(DataLoader workers, channels-last and mixed precision on a GPU, deterministic on the CPU).

Like :mod:`asign._encoders`, this module imports only numpy at module level and never spatialdata or anndata, so the
engine can be benchmarked on machines that only have torch, numpy and dask (``benchmarks/gpu_features.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._encoders import PAD_VALUE, Encoder

if TYPE_CHECKING:
    import torch


def _is_dask(arr: Any) -> bool:
    return type(arr).__module__.startswith("dask") and hasattr(arr, "chunks")


class ImageSource:
    """Reads square patches from one ``(3, H, W)`` image (numpy or dask), padding outside the image with white.

    A dask image is read chunk by chunk: only the chunks a patch overlaps are computed, and they are kept in a
    small LRU cache (``cache_bytes``) because neighbouring patches share chunks. The whole image is never
    computed unless every chunk is needed.
    """

    def __init__(self, arr: Any, *, cache_bytes: int = 256 * 2**20):
        if arr.ndim != 3 or arr.shape[0] != 3:
            msg = f"Image must be (3, y, x) RGB, got shape {tuple(arr.shape)}."
            raise ValueError(msg)
        self.arr = arr
        self.height, self.width = int(arr.shape[1]), int(arr.shape[2])
        self.lazy = _is_dask(arr)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self.chunks_computed = 0
        if self.lazy:
            self.ybounds = np.concatenate([[0], np.cumsum(arr.chunks[1])]).astype(np.int64)
            self.xbounds = np.concatenate([[0], np.cumsum(arr.chunks[2])]).astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_cached_bytes"] = OrderedDict(), 0
        return state

    def clear_cache(self) -> None:
        """Drop the cached chunks (they may be views that keep a whole decoded image alive)."""
        self._cache.clear()
        self._cached_bytes = 0

    def chunk_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk (row, col) containing pixels ``(x, y)`` (clipped to the image)."""
        if not self.lazy:
            return np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
        yy = np.clip(y, 0, self.height - 1)
        xx = np.clip(x, 0, self.width - 1)
        return np.searchsorted(self.ybounds, yy, side="right") - 1, np.searchsorted(self.xbounds, xx, side="right") - 1

    def _chunks(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """The chunks ``keys`` (row, col) as numpy arrays; the missing ones are computed in one dask call."""
        import dask

        out: dict[tuple[int, int], np.ndarray] = {}
        missing = []
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
                out[k] = self._cache[k]
            else:
                missing.append(k)
        if missing:
            yb, xb = self.ybounds, self.xbounds
            parts = [self.arr[:, yb[i] : yb[i + 1], xb[j] : xb[j + 1]] for i, j in missing]
            # no thread pool inside DataLoader worker processes (one reader per process already)
            scheduler = "synchronous" if _in_dataloader_worker() else None
            vals = dask.compute(*parts, scheduler=scheduler)
            self.chunks_computed += len(missing)
            for k, v in zip(missing, vals, strict=True):
                v = np.asarray(v)
                out[k] = v
                self._cache[k] = v
                self._cached_bytes += v.nbytes
            while self._cached_bytes > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return out

    def read(self, x0: Sequence[int], y0: Sequence[int], size: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Patches ``[y0, y0 + size) x [x0, x0 + size)``: uint8 ``(B, 3, size, size)``, white outside the image.

        ``out`` (optional) is a preallocated uint8 array of that shape to fill.
        """
        x0 = np.asarray(x0, dtype=np.int64)
        y0 = np.asarray(y0, dtype=np.int64)
        if out is None:
            out = np.empty((len(x0), 3, size, size), dtype=np.uint8)
        xa, xb = np.clip(x0, 0, self.width), np.clip(x0 + size, 0, self.width)
        ya, yb = np.clip(y0, 0, self.height), np.clip(y0 + size, 0, self.height)
        # white only where a patch leaves the image
        partial = (xa > x0) | (ya > y0) | (xb < x0 + size) | (yb < y0 + size)
        out[partial] = PAD_VALUE
        inside = np.flatnonzero((xb > xa) & (yb > ya))
        if not self.lazy:
            for b in inside:
                out[b, :, ya[b] - y0[b] : yb[b] - y0[b], xa[b] - x0[b] : xb[b] - x0[b]] = self.arr[
                    :, ya[b] : yb[b], xa[b] : xb[b]
                ]
            return out
        r0, c0 = self.chunk_index(xa, ya)
        r1, c1 = self.chunk_index(xb - 1, yb - 1)
        need = {b: [(i, j) for i in range(r0[b], r1[b] + 1) for j in range(c0[b], c1[b] + 1)] for b in inside}
        all_keys = list(dict.fromkeys(k for b in inside for k in need[b]))
        chunk_bytes = 3 * int(np.diff(self.ybounds).max()) * int(np.diff(self.xbounds).max()) * self.arr.dtype.itemsize
        # one dask call per batch when the batch's chunks fit the cache, otherwise one per patch
        batch_chunks = self._chunks(all_keys) if len(all_keys) * chunk_bytes <= self.cache_bytes else None
        for b in inside:
            chunks = batch_chunks if batch_chunks is not None else self._chunks(need[b])
            for i, j in need[b]:
                c = chunks[(i, j)]
                cy0, cx0 = self.ybounds[i], self.xbounds[j]
                sy0, sy1 = max(ya[b], cy0), min(yb[b], self.ybounds[i + 1])
                sx0, sx1 = max(xa[b], cx0), min(xb[b], self.xbounds[j + 1])
                out[b, :, sy0 - y0[b] : sy1 - y0[b], sx0 - x0[b] : sx1 - x0[b]] = c[
                    :, sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0
                ]
        return out


def pick_level(side: int, target: int | None, scales: Sequence[float | None]) -> int:
    """Index of the coarsest pyramid level from which a ``side`` px (level-0) patch still has ``target`` px.

    ``scales[k]`` is level ``k``'s pixel size in level-0 pixels (``scales[0] == 1``; `None` marks a level that
    must not be used). The patch covers ``round(side / scales[k])`` pixels of level ``k``; the coarsest level where
    that is at least ``target`` wins, so the encoder input is never upsampled from a coarser level than needed
    (e.g. a 1024 px tile for a 224 px input is read from a 4x coarser level as 256 px). ``target=None`` (native
    size input) always gives level 0.
    """
    if target is None:
        return 0
    best, best_scale = 0, 1.0
    for k, sc in enumerate(scales):
        if sc is None or k == 0:
            continue
        if round(side / float(sc)) >= int(target) and float(sc) > best_scale:
            best, best_scale = k, float(sc)
    return best


def level_window(
    x0: np.ndarray, y0: np.ndarray, side: int, scale_y: float, scale_x: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """The window of a pyramid level covering level-0 patches ``[x0, x0 + side) x [y0, y0 + side)``.

    Level pixel ``j`` covers level-0 ``[j s, (j + 1) s)``; corners are rounded to the nearest level pixel and the
    (square) side to ``round(side / s)`` with ``s`` the mean of the two axis scales, so the window is off by less
    than one level pixel. Returns ``(x0_level, y0_level, side_level)``.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    if scale_x == 1.0 and scale_y == 1.0:
        return x0.astype(np.int64), y0.astype(np.int64), int(side)
    xk = np.floor(x0 / scale_x + 0.5).astype(np.int64)
    yk = np.floor(y0 / scale_y + 0.5).astype(np.int64)
    return xk, yk, max(1, int(round(side / (0.5 * (scale_x + scale_y)))))


def _in_dataloader_worker() -> bool:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover
        return False
    return get_worker_info() is not None


def _morton(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Z-order key of non-negative integer pairs (< 2**16), for spatially coherent batches."""
    key = np.zeros(len(i), dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    for bit in range(16):
        key |= ((i >> bit) & 1) << (2 * bit + 1)
        key |= ((j >> bit) & 1) << (2 * bit)
    return key


@dataclass
class PatchJob:
    """Square patches of one size from one image: top-left corners and the output rows they fill.

    ``label`` names them in messages (e.g. ``"spot patches of section 'A'"``).
    """

    image: int
    x0: np.ndarray
    y0: np.ndarray
    size: int
    rows: np.ndarray
    label: str = ""


class PatchDataset:
    """A map-style torch dataset whose items are whole batches of uint8 patches ``(B, 3, s, s)``.

    Patches of each job are ordered spatially (Z-order of image chunks) so that a batch touches few chunks.
    Consecutive jobs whose patches come out at the same side share batches (so every batch but the last of such a
    run is full). Patches are read lazily from :class:`ImageSource` objects, a few MiB of raw pixels at a time.

    With ``resize=True`` (and a fixed ``input_size``) the reader resizes every patch to ``input_size`` with
    antialiased bilinear interpolation on uint8 (as torchvision does), so all jobs share batches of side
    ``input_size``. With ``resize=False`` the reader only reads: batches hold the patches at their read side and the
    resize is left to the consumer (:class:`Encoder` resizes on its device); batches of patches larger than twice
    ``input_size`` (or than 224 px for native-size input) shrink in proportion to their area.

    Item ``b`` is ``(b, patches)``. When a shared-memory ``ring`` (``(n_slots, slot_bytes)`` uint8, see
    :meth:`make_ring`) is attached, DataLoader workers write batch ``b`` into slot ``b % n_slots`` and return only
    ``(b, n)``: nothing large is pickled, and the main process reads (or DMAs) the slot directly. The chunk cache of
    a source is dropped once the last batch that reads from it has been read.
    """

    def __init__(
        self,
        sources: list[ImageSource],
        jobs: list[PatchJob],
        *,
        batch_size: int,
        input_size: int | None,
        resize: bool = True,
    ) -> None:
        self.sources = sources
        self.input_size = input_size
        self.resize = bool(resize) and input_size is not None
        self.ring = None
        self._scratch: dict[int, np.ndarray] = {}
        # a batch is a list of segments (image, rows, x0, y0, size)
        self.batches: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]]] = []
        ordered = []
        for job in jobs:
            if len(job.rows) == 0:
                continue
            src = sources[job.image]
            ci, cj = src.chunk_index(job.x0 + job.size // 2, job.y0 + job.size // 2)
            order = np.lexsort((job.x0, job.y0, _morton(np.maximum(ci, 0), np.maximum(cj, 0))))
            ordered.append((job, order))
        current: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]] = []
        filled, current_side = 0, None
        for job, order in ordered:
            side = self.input_size if self.resize else job.size
            if side != current_side and current:
                self.batches.append(current)
                current, filled = [], 0
            current_side = side
            ref = 224 if input_size is None else 2 * int(input_size)
            cap = batch_size if self.resize else max(1, int(batch_size * min(1.0, (ref / side) ** 2)))
            s = 0
            while s < len(order):
                take = min(cap - filled, len(order) - s)
                o = order[s : s + take]
                current.append((job.image, job.rows[o], job.x0[o], job.y0[o], job.size))
                filled += take
                s += take
                if filled == cap:
                    self.batches.append(current)
                    current, filled = [], 0
        if current:
            self.batches.append(current)
        self.max_batch = max((self.batch_len(b) for b in range(len(self.batches))), default=0)
        self._last_batch: dict[int, int] = {}
        for b, segs in enumerate(self.batches):
            for seg in segs:
                self._last_batch[seg[0]] = b

    def __len__(self) -> int:
        return len(self.batches)

    def batch_len(self, b: int) -> int:
        return int(sum(len(seg[1]) for seg in self.batches[b]))

    def batch_side(self, b: int) -> int:
        return int(self.input_size if self.resize else self.batches[b][0][4])

    def rows(self, b: int) -> np.ndarray:
        """Output rows of batch ``b``."""
        return np.concatenate([seg[1] for seg in self.batches[b]]).astype(np.int64)

    def images(self, b: int) -> np.ndarray:
        """Source (``PatchJob.image``) index of every patch of batch ``b``."""
        return np.concatenate([np.full(len(seg[1]), seg[0], dtype=np.int64) for seg in self.batches[b]])

    def n_patches(self) -> int:
        return int(sum(self.batch_len(b) for b in range(len(self.batches))))

    def make_ring(self, n_slots: int):
        """Allocate (and attach) a shared-memory ring of ``n_slots`` batch buffers; returns it."""
        import torch

        slot = max((self.batch_len(b) * 3 * self.batch_side(b) ** 2 for b in range(len(self.batches))), default=1)
        self.ring = torch.empty((int(n_slots), int(slot)), dtype=torch.uint8).share_memory_()
        return self.ring

    def slot_view(self, b: int):
        """The ring slot of batch ``b`` as a ``(n, 3, s, s)`` uint8 tensor."""
        n, side = self.batch_len(b), self.batch_side(b)
        return self.ring[b % self.ring.shape[0], : n * 3 * side * side].view(n, 3, side, side)

    def _read_into(self, out, image: int, x0: np.ndarray, y0: np.ndarray, size: int) -> None:
        import torch
        import torch.nn.functional as F

        src = self.sources[image]
        target = self.input_size
        if not self.resize or size == target:
            src.read(x0, y0, size, out=out.numpy())
            return
        # read and resize a few patches at a time into a reused scratch buffer (no large fresh allocations)
        step = max(1, min(len(x0), (8 * 2**20) // (3 * size * size)))
        scratch = self._scratch.get(size)
        if scratch is None or scratch.shape[0] < step:
            scratch = self._scratch[size] = np.empty((step, 3, size, size), dtype=np.uint8)
        for i in range(0, len(x0), step):
            j = min(i + step, len(x0))
            raw = src.read(x0[i:j], y0[i:j], size, out=scratch[: j - i])
            small = F.interpolate(
                torch.from_numpy(raw), size=(target, target), mode="bilinear", antialias=True, align_corners=False
            )
            out[i:j].copy_(small)

    def __getitem__(self, b: int):
        import torch

        n, side = self.batch_len(b), self.batch_side(b)
        out = self.slot_view(b) if self.ring is not None else torch.empty((n, 3, side, side), dtype=torch.uint8)
        k = 0
        for img, r, x0, y0, size in self.batches[b]:
            self._read_into(out[k : k + len(r)], img, x0, y0, size)
            k += len(r)
        for img in {seg[0] for seg in self.batches[b]}:
            if self._last_batch.get(img, -1) <= b:
                self.sources[img].clear_cache()
        return (b, n) if self.ring is not None else (b, out)


def _as_torch_dataset(ds: PatchDataset):
    from torch.utils.data import Dataset

    class _DS(Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            return ds[i]

    return _DS()


@contextlib.contextmanager
def deterministic_cpu(*, enabled: bool = True):
    """Ask oneDNN (the CPU convolution backend) for deterministic kernels, restoring the setting afterwards.

    :func:`torch.use_deterministic_algorithms` is not used: its first call imports ``torch._inductor`` (seconds),
    and the CPU kernels used here are deterministic once oneDNN is.
    """
    import torch

    mk = torch.backends.mkldnn
    if not enabled or not hasattr(mk, "deterministic"):
        yield
        return
    prev = mk.deterministic
    mk.deterministic = True
    try:
        yield
    finally:
        mk.deterministic = prev


def _host_register(t) -> bool:
    """Page-lock a CPU tensor's memory in place (``cudaHostRegister``), so the GPU can DMA from it directly."""
    import torch

    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    except (RuntimeError, AttributeError):  # pragma: no cover - no CUDA runtime bindings
        return False
    return int(getattr(err, "value", err)) == 0


def _host_unregister(t) -> None:
    import torch

    with contextlib.suppress(RuntimeError, AttributeError):
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def embed_patches(
    encoder: Encoder,
    sources: list[ImageSource],
    jobs: list[PatchJob],
    n_rows: int,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    mixed_precision: bool | None = None,
    channels_last: bool = True,
    resize: str = "device",
    show_progress_bar: bool = True,
    desc: str = "features",
    stats: dict[str, float] | None = None,
    od_maps: np.ndarray | None = None,
    tta: str = "none",
    keep_views: bool = False,
) -> np.ndarray:
    """Embed every patch of ``jobs`` with ``encoder``; returns float32 ``(n_rows, dim)`` (NaN for rows not covered).

    Batches are produced by a :class:`torch.utils.data.DataLoader` over a :class:`PatchDataset`. With
    ``resize="device"`` the readers only read uint8 patches at their read side and the resize to the encoder's
    ``input_size`` runs batched on ``device`` (:func:`~asign._encoders.resize_batch`, float32), so on a GPU the CPU never resizes;
    ``resize="reader"`` resizes on uint8 in the readers instead (the behaviour before device resizing). With
    ``num_workers > 0`` the reader processes write each batch into a shared-memory ring of batch buffers (page-locked
    on CUDA), so the main process neither unpickles nor copies pixels: it DMAs the slot to the device on a side
    stream. Batches are uint8 until the device, where they are normalised and embedded under
    :func:`torch.inference_mode`, channels-last, with autocast on CUDA (``mixed_precision``, default on CUDA), and
    with deterministic oneDNN kernels on the CPU. Features stay on the device and are copied back every few batches.

    ``od_maps`` (``(len(sources), 3, 3)``, optional) stain-normalises every patch on the device with the matrix of
    its source (:mod:`asign.pp._stain`); ``tta`` (``"none"``, ``"flips"``, ``"dihedral"``) averages each patch's
    features over its flipped / rotated views (:meth:`Encoder.__call__`); with ``keep_views=True`` the result is the
    per-view features, ``(n_rows, n_views, dim)``, instead of their mean.
    """
    import torch
    from torch.utils.data import DataLoader

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if mixed_precision is None:
        mixed_precision = cuda
    if resize not in ("device", "reader"):
        msg = f"`resize` must be 'device' or 'reader', got {resize!r}."
        raise ValueError(msg)
    from asign.pp._stain import TTA_VIEWS, check_tta

    tta = check_tta(tta)
    shape = (encoder.dim,) if not keep_views else (TTA_VIEWS[tta], encoder.dim)
    maps_dev = None
    if od_maps is not None:
        od_maps = np.asarray(od_maps, dtype=np.float32)
        if od_maps.shape != (len(sources), 3, 3):
            msg = f"`od_maps` must have shape ({len(sources)}, 3, 3) (one matrix per source), got {od_maps.shape}."
            raise ValueError(msg)
        maps_dev = torch.from_numpy(od_maps).to(device)
    encoder.to(device, channels_last=channels_last)
    ds = PatchDataset(sources, jobs, batch_size=batch_size, input_size=encoder.input_size, resize=resize == "reader")
    out = np.full((n_rows, *shape), np.nan, dtype=np.float32)
    if len(ds) == 0:
        return out
    # per-batch stain maps, moved to the device once before the loop (not a host-to-device copy per batch)
    batch_maps = (
        None if maps_dev is None else [maps_dev[torch.from_numpy(ds.images(b)).to(device)] for b in range(len(ds))]
    )
    prefetch = 2
    ring = None
    registered = False
    if num_workers > 0:
        # batch b goes to slot b % n_slots; the DataLoader keeps at most prefetch * num_workers batches in flight,
        # and the main loop waits for the copy of batch b - 1 before asking for batch b + 1, so a slot is never
        # rewritten while it is read (3 spare slots)
        ring = ds.make_ring(prefetch * num_workers + 3)
        registered = cuda and _host_register(ring)
    loader = DataLoader(
        _as_torch_dataset(ds),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=prefetch if num_workers > 0 else None,
    )
    bar = None
    if show_progress_bar:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=ds.n_patches(), desc=desc, unit="patch")
        except ImportError:  # pragma: no cover
            bar = None
    pending: list[tuple[np.ndarray, torch.Tensor]] = []
    flush_every = 32 if cuda else 1

    def flush() -> None:
        for r, f in pending:
            out[r] = f.cpu().numpy()
        pending.clear()

    copy_stream = torch.cuda.Stream(device=device) if cuda else None
    staging: list = []
    prev_event = None
    t_start = time.perf_counter()
    t_first = None
    n_first = 0
    try:
        with torch.inference_mode(), deterministic_cpu(enabled=not cuda):
            for i, (b, payload) in enumerate(loader):
                b = int(b)
                if t_first is None:
                    t_first, n_first = time.perf_counter(), ds.batch_len(b)
                rows = ds.rows(b)
                host = ds.slot_view(b) if ring is not None else payload
                if cuda:
                    if ring is not None and not registered:
                        # no page-locking available: go through a pinned staging buffer
                        if not staging:
                            staging = [torch.empty(ring.shape[1], dtype=torch.uint8).pin_memory() for _ in range(2)]
                        st = staging[i % 2][: host.numel()].view(host.shape)
                        st.copy_(host)
                        host = st
                    elif ring is None:
                        host = host.pin_memory()
                    with torch.cuda.stream(copy_stream):
                        x = host.to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(copy_stream)
                    torch.cuda.current_stream(device).wait_stream(copy_stream)
                    x.record_stream(torch.cuda.current_stream(device))
                    if prev_event is not None:
                        prev_event.synchronize()  # slot (and staging buffer) of batch i - 1 may be reused now
                    prev_event = event
                else:
                    x = host
                feats = encoder(
                    x,
                    mixed_precision=mixed_precision,
                    channels_last=channels_last,
                    resize=True,
                    od_map=None if batch_maps is None else batch_maps[b],
                    tta=tta,
                    keep_views=keep_views,
                )
                if tuple(feats.shape) != (len(rows), *shape):
                    msg = (
                        f"Encoder {encoder.name!r} returned shape {tuple(feats.shape)}, expected {(len(rows), *shape)}."
                    )
                    raise ValueError(msg)
                pending.append((rows, feats.float()))
                if len(pending) >= flush_every:
                    flush()
                if bar is not None:
                    bar.update(len(rows))
            flush()
            if prev_event is not None:
                prev_event.synchronize()
        if stats is not None and t_first is not None:
            t_end = time.perf_counter()
            stats["setup_s"] = t_first - t_start  # ring, workers, first batch
            stats["loop_s"] = t_end - t_first
            stats["total_s"] = t_end - t_start
            stats["steady_patches_per_s"] = (ds.n_patches() - n_first) / max(t_end - t_first, 1e-9)
    finally:
        if registered:
            torch.cuda.synchronize(device)
            _host_unregister(ring)
        ds.ring = None
        if bar is not None:
            bar.close()
    check_finite(out, jobs, encoder.name)
    return out


def check_finite(out: np.ndarray, jobs: Sequence[PatchJob], name: str) -> None:
    """Raise a ValueError naming the jobs (their labels: scale and section) whose features are NaN or infinite."""
    bad, n_bad = [], 0
    for job in jobs:
        if len(job.rows) == 0:
            continue
        f = out[job.rows].reshape(len(job.rows), -1)
        k = int((~np.isfinite(f).all(axis=1)).sum())
        if k:
            bad.append(f"{job.label or f'job {len(bad)}'} ({k} of {len(job.rows)})")
            n_bad += k
    if bad:
        msg = (
            f"Encoder {name!r} returned NaN or infinite features for {n_bad} patch(es): {'; '.join(bad)}. Check the "
            "encoder (its weights, or overflow in half precision: mixed_precision=False) and the images."
        )
        raise ValueError(msg)
