"""``compare --per-token``: one row per (real token, MoE router) with both models' top-k sets, streamed batch by batch.

Rows go to a temporary file next to the target, renamed into place only when the whole run finished, so an
interrupted run leaves nothing half-written. CSV always; Parquet when pyarrow is installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moe_inspect.errors import UserError
from moe_inspect.io.corpus import Batch
from moe_inspect.io.export import _umask
from moe_inspect.model.routers import RouterSpec

COLUMNS = ("sequence", "position", "token_id", "token", "layer", "experts_a", "experts_b", "same_set")


def check_target(path: str | Path) -> str:
    """'csv' or 'parquet' from the extension; refuse Parquet without pyarrow before any model loads."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("Writing Parquet needs pyarrow (pip install pyarrow); or give a .csv path.") from None
        return "parquet"
    raise UserError(f"The per-token file '{path}' must end in .csv or .parquet.")


def _sets(experts: torch.Tensor) -> np.ndarray:
    return np.array([" ".join(map(str, row)) for row in experts.tolist()], dtype=object)


class PerTokenWriter:
    """Streams per-token rows; ``commit()`` moves the finished file into place, ``abort()`` removes it."""

    def __init__(self, path: str | Path, tokenizer: Any) -> None:
        self.path = Path(path)
        self.kind = check_target(self.path)
        self.tokenizer = tokenizer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.sequences = 0
        self.rows = 0
        self._parquet: Any = None
        self._header = True

    def write(self, batch: Batch, routers: list[RouterSpec], a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
        mask = batch.attention_mask.bool()
        seq_idx = mask.nonzero(as_tuple=True)[0]
        token_ids = batch.input_ids[mask].tolist()
        positions = (batch.attention_mask.cumsum(-1) - 1)[mask].numpy()
        tokens = np.array([self.tokenizer.decode([t]) for t in token_ids], dtype=object)
        parts = []
        for spec, exp_a, exp_b in zip(routers, a, b, strict=True):
            same = (torch.sort(exp_a, -1).values == torch.sort(exp_b, -1).values).all(-1).numpy()
            parts.append(
                pd.DataFrame(
                    {
                        "sequence": seq_idx.numpy() + self.sequences,
                        "position": positions,
                        "token_id": token_ids,
                        "token": tokens,
                        "layer": spec.layer,
                        "experts_a": _sets(exp_a),
                        "experts_b": _sets(exp_b),
                        "same_set": same,
                    }
                )
            )
        frame = pd.concat(parts, ignore_index=True).sort_values(["sequence", "position"], kind="stable")
        self.sequences += int(batch.input_ids.shape[0])
        self.rows += len(frame)
        if self.kind == "csv":
            frame.to_csv(self.tmp, mode="a", header=self._header, index=False)
            self._header = False
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.tmp, table.schema)
        self._parquet.write_table(table)

    def commit(self) -> Path:
        if self._parquet is not None:
            self._parquet.close()
        elif self.kind == "parquet":
            raise RuntimeError("no rows were written")
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask like every output file
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        self.tmp.unlink(missing_ok=True)
