"""The `corrosion-export` command, which a device install has too (one wheel, two scripts).

The cloud side needs the `export` extra (xgboost, onnx, onnxmltools, ...); without it the
command says so in one line rather than with a traceback from an import deep in the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from export.cli import main as cli
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in ("agent", "export"):
            raise  # ours: a broken install, not a missing extra
        print(
            f"error: corrosion-export needs the cloud-side packages ({exc.name} is missing): "
            "pip install 'corrosion-edge[export]'",
            file=sys.stderr,
        )
        return 2
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
