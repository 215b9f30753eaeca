"""Regenerate the committed gRPC modules of this directory from its ``.proto`` files.

Run ``python -m graphdriver.snapshotter.api.generate`` (or this file) after editing a ``.proto``:
it needs ``grpcio-tools`` (protoc and the Python/gRPC generators) and ``mypy-protobuf``
(``protoc-gen-mypy``, ``protoc-gen-mypy_grpc``, for the ``.pyi`` stubs), none of which are
needed at run time.  The modules are committed so that installing graphdriver never runs protoc.
It imports nothing of graphdriver.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[2]  # the directory holding the graphdriver package
PROTOS = ("mount.proto", "snapshots.proto")


def main() -> int:
    import grpc_tools  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from grpc_tools import protoc  # type: ignore[import-not-found, import-untyped, unused-ignore]

    include = Path(grpc_tools.__file__).parent / "_proto"
    for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        if shutil.which(plugin) is None:
            print(f"generate: {plugin} not found (pip install mypy-protobuf)", file=sys.stderr)
            return 1
    args = [
        "protoc", f"-I{SRC}", f"-I{include}",
        f"--python_out={SRC}", f"--grpc_python_out={SRC}",
        f"--mypy_out={SRC}", f"--mypy_grpc_out={SRC}",
        *(str((HERE / name).relative_to(SRC)) for name in PROTOS),
    ]
    status = int(protoc.main(args))
    for stub in ("mount_pb2_grpc.py", "mount_pb2_grpc.pyi"):  # mount.proto has no service
        (HERE / stub).unlink(missing_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
