"""``make bench-codecs``: which compression to store bodies with, measured on the stub's own
JSON (a 100-item /transactions page, /summary, /category-summary, /sessions).

For each codec and level: the compressed size against the raw JSON, the time to compress
(once per fill) and to decompress (for each client that does not accept the encoding), per
page, best of several rounds. Writes bench/results/codecs.json.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import brotli  # type: ignore[import-untyped]
import zstandard
from isal import igzip, isal_zlib

from upstream_stub.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 200

Codec = tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]


def pages() -> dict[str, bytes]:
    """Bodies as the stub makes them, for alice."""
    data = Dataset(seed=7)
    user = data.user_for("alice-token")
    assert user is not None
    sessions = data.visible_sessions(user)
    txns = [t.as_json() for t in sessions[0].transactions[:100]]
    def dump(doc: object) -> bytes:
        return json.dumps(doc, separators=(",", ":")).encode()

    return {
        "transactions (100 items)": dump({"session_id": sessions[0].id, "page": 1,
                                          "page_size": 100, "total": 200,
                                          "data_version": 0, "items": txns}),
        "category-summary": dump({"session_id": sessions[0].id, "data_version": 0,
                                  "categories": [{"category": c, "count": 10, "total": -12.5}
                                                 for c in ("Bills", "Groceries", "Health",
                                                           "Income", "Shopping", "Transport")]}),
        "sessions": dump({"data_version": 0, "sessions": [
            {"id": s.id, "owner": s.owner, "filename": s.filename,
             "uploaded_at": s.uploaded_at, "transaction_count": len(s.transactions),
             "categorised_count": 0} for s in sessions]}),
    }


def codecs() -> list[Codec]:
    out: list[Codec] = []
    for level in (1, 6):
        out.append((f"gzip (zlib) {level}", partial(gzip.compress, compresslevel=level, mtime=0),
                    gzip.decompress))
    for level in (0, 1, 2):
        out.append((f"gzip (isal) {level}", partial(igzip.compress, compresslevel=level, mtime=0),
                    igzip.decompress))
    out.append(("deflate (isal) 1", partial(isal_zlib.compress, level=1), isal_zlib.decompress))
    for level in (1, 3, 9):
        c = zstandard.ZstdCompressor(level=level)
        out.append((f"zstd {level}", c.compress, zstandard.ZstdDecompressor().decompress))
    for q in (1, 4, 9):
        out.append((f"brotli {q}", partial(brotli.compress, quality=q), brotli.decompress))
    return out


def best_of(fn: Callable[[bytes], bytes], data: bytes) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        t = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    bodies = pages()
    results = []
    zlib_version = zlib.ZLIB_RUNTIME_VERSION
    print(f"zlib {zlib_version}, isal, zstandard {zstandard.__version__}, "
          f"brotli {brotli.__version__}; best of {ROUNDS}\n")
    for page, raw in bodies.items():
        print(f"{page}: {len(raw):,} bytes raw")
        print(f"  {'codec':<18} {'ratio':>6} {'compress':>10} {'decompress':>11}")
        for name, compress, decompress in codecs():
            packed = compress(raw)
            assert decompress(packed) == raw
            c = best_of(compress, raw) * 1e6
            d = best_of(decompress, packed) * 1e6
            ratio = len(packed) / len(raw)
            results.append({"page": page, "raw": len(raw), "codec": name,
                            "ratio": round(ratio, 4), "compress_us": round(c, 1),
                            "decompress_us": round(d, 1)})
            print(f"  {name:<18} {ratio:>6.3f} {c:>8.1f}µs {d:>9.1f}µs")
        print()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "codecs.json").write_text(json.dumps(results, indent=2))
    print(f"written to {out / 'codecs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
