"""The KV cache: keys and values of positions already processed, with per-row key validity, partial appends and
row selection / stacking (a request joining or leaving a running batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys and values of tokens already processed, one (k, v) pair per layer, each (B, n_kv, T_cache, hd) (grouped
    K/V heads are stored once, not expanded to the query heads).

    A forward pass with `kv_cache=cache` attends to the cached keys before its own; with `cache_update=True` it also
    appends its own keys/values (autoregressive decoding, a finished block); with a bool mask (T,) only the positions
    it marks; with a bool mask (B, T) every position, each row's new keys valid where the mask marks them.
    key_valid (B, T_cache) bool or None (every key valid): per row, the cached keys its queries may attend to
    (False on left padding, or where another row's position was appended). The network applies it by itself.
    hidden (B, T_h, C): the final hidden states of the first T_h cached positions, kept only by networks with shifted
    predictions, whose first new position reads hidden[:, -1] (none when T_h = 0). Usually T_h = T_cache; a cache
    whose later entries sit after the queries (Fast-dLLM's dual cache: [prefix ; suffix]) holds the prefix's only.
    Rows can be picked (`select`) and caches of several requests stacked (`cat`), which is how a row joins or
    leaves a running batch.
    capacity > 0: appends are written in place into storage reserved for that many positions (grown to twice what it must hold when full), and
    `layers` are views of its filled part, so a decoding step costs O(new keys), not a copy of the whole cache; `crop`
    keeps the storage, and the next append overwrites the cropped positions (a view of them taken before is then
    changed). 0 (the default): every append concatenates into new tensors, and a cached tensor never changes.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    capacity: int = 0
    storage: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, keep: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv, t, hd) to `layer` in place (capacity > 0) and return its keys and values (views of
        the storage, (B, n_kv, T_cache + t, hd)). The storage is (re)allocated, the cached part copied into it, when
        it is missing, too small, or no longer the one the layer's views are of (after `select` / `cat`).
        keep=False: a call that reads the cache without extending it; k, v are written after the cached part as
        scratch (the next append overwrites them) and the layer keeps its length, so no call copies the cache."""
        old = self.layers[layer] if layer < len(self.layers) else None
        if old is None and not keep:
            return k, v
        n, t = (0 if old is None else old[0].shape[2]), k.shape[2]
        buf = self.storage[layer] if layer < len(self.storage) else None
        owned = buf is not None and (old is None or (old[0].data_ptr() == buf[0].data_ptr()
                                                     and old[0].stride() == buf[0].stride()
                                                     and old[0].shape[:2] == buf[0].shape[:2]))
        if not owned or buf[0].shape[2] < n + t or buf[0].shape[:2] != k.shape[:2]:
            size = max(self.capacity, 2 * (n + t))
            buf = tuple(x.new_empty((*x.shape[:2], size, x.shape[3])) for x in (k, v))
            if old is not None:
                buf[0][:, :, :n], buf[1][:, :, :n] = old
        buf[0][:, :, n:n + t], buf[1][:, :, n:n + t] = k, v
        kept = (buf[0][:, :, :n + t], buf[1][:, :, :n + t])
        if layer < len(self.storage):
            self.storage[layer] = buf
        else:
            self.storage.append(buf)
        if not keep:
            self.layers[layer] = (buf[0][:, :, :n], buf[1][:, :, :n])  # the same keys, in this storage
        elif old is not None:
            self.layers[layer] = kept
        else:
            self.layers.append(kept)
        return kept

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    @property
    def batch(self) -> int | None:
        return self.layers[0][0].shape[0] if self.layers else None

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached positions (sliding windows, dropping a suffix)."""
        self.layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]
        self.hidden = None if self.hidden is None else self.hidden[:, :length]
        self.key_valid = None if self.key_valid is None else self.key_valid[:, :length]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding only the batch rows `rows` (B_a,) (a sampler that drops finished sequences)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return KVCache([(k[rows], v[rows]) for k, v in self.layers], pick(self.hidden), pick(self.key_valid),
                       self.capacity)

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        """The rows of several caches stacked, in order (requests joining one batch). Caches of different lengths
        are left-padded with keys no row attends to (rotary keys carry their own positions, so a row's attention
        is unchanged); `hidden` is kept when every cache has it for all its positions (left-padded with zeros like
        the keys, so hidden[:, -1] stays each row's last state), or for the same number of them at one length."""
        caches = [c for c in caches if c.layers]
        if not caches:
            return KVCache()
        if len({len(c.layers) for c in caches}) != 1:
            raise ValueError("caches of different numbers of layers cannot be stacked")
        T = max(c.length for c in caches)

        def pad(x, c):  # (B, n_kv, t, hd) -> (B, n_kv, T, hd), zeros on the left
            return torch.nn.functional.pad(x, (0, 0, T - c.length, 0))

        layers = [(torch.cat([pad(c.layers[i][0], c) for c in caches]), torch.cat([pad(c.layers[i][1], c) for c in caches]))
                  for i in range(len(caches[0].layers))]
        valid = None
        if any(c.key_valid is not None or c.length < T for c in caches):
            parts = []
            for c in caches:
                v = c.key_valid if c.key_valid is not None else torch.ones(c.batch, c.length, dtype=torch.bool,
                                                                         device=c.layers[0][0].device)
                parts.append(torch.nn.functional.pad(v, (T - c.length, 0), value=False))
            valid = torch.cat(parts)
        hidden = None
        if all(c.hidden is not None for c in caches) and len({c.hidden.shape[1] for c in caches}) == 1 \
                and all(c.length == T for c in caches):
            hidden = torch.cat([c.hidden for c in caches])
        elif all(c.hidden is not None and c.hidden.shape[1] == c.length for c in caches):  # (B, T, C) each
            hidden = torch.cat([torch.nn.functional.pad(c.hidden, (0, 0, T - c.length, 0)) for c in caches])
        return KVCache(layers, hidden, valid, max(c.capacity for c in caches))

    def attention_mask(self, batch: int, queries: int, device) -> torch.Tensor | None:
        """(B, 1, 1, T_cache + T) bool: which keys the queries of this call may see (cached: `key_valid`; the call's
        own: all, the caller's mask decides), or None when every cached key is valid."""
        if self.key_valid is None:
            return None
        own = torch.ones(self.key_valid.shape[0], queries, dtype=torch.bool, device=device)
        return torch.cat((self.key_valid.to(device), own), 1)[:, None, None, :].expand(batch, 1, 1, -1)

    def append_valid(self, update, batch: int, queries: int, device) -> None:
        """Extend `key_valid` after a call that appended with `cache_update` (see `appended_columns`)."""
        if isinstance(update, torch.Tensor) and update.dim() == 2:  # every position, valid per row
            new = update.to(device)
            if self.key_valid is None and bool(new.all()):
                return
        else:
            if self.key_valid is None:
                return
            n = queries if not isinstance(update, torch.Tensor) else int(update.sum())
            new = torch.ones(batch, n, dtype=torch.bool, device=device)
        old = self.key_valid
        if old is None:
            old = torch.ones(batch, self.length - new.shape[1], dtype=torch.bool, device=device)
        self.key_valid = torch.cat((old.to(device), new), 1)


def updates_cache(update) -> bool:
    """Whether a `cache_update` (a bool, or a mask of the positions to append) appends anything."""
    if isinstance(update, torch.Tensor):
        return update.dim() == 2 or bool(update.any())  # (B, T): every position is appended
    return bool(update)


def appended_columns(update, queries: int) -> torch.Tensor | None:
    """The query positions a `cache_update` appends, or None for all of them. True: all. A (T,) bool mask: the
    positions it marks, for every row. A (B, T) bool mask: all, each row's keys valid where it marks them (a row's
    left padding, or a position only other rows append)."""
    if not isinstance(update, torch.Tensor):
        return None
    if update.dtype != torch.bool or update.shape[-1] != queries or update.dim() not in (1, 2):
        raise ValueError(f"cache_update as a mask must be bool ({queries},) or (batch, {queries}); got "
                         f"{update.dtype} {tuple(update.shape)}")
    return update if update.dim() == 1 and not bool(update.all()) else None
