"""Generates the Python gRPC stubs of server/proto/ into server/gen/ (committed to the repo).

    python -m tools.generate_protos            # rewrite server/gen/
    python -m tools.generate_protos --out=DIR  # write elsewhere (the stale-stub test does)

Needs grpcio-tools (the `dev` extra). protoc names the generated modules after the proto's path
(`jaxserve/v1/jaxserve_pb2.py`), and its service module imports the message module as
`from jaxserve.v1 import ...`, which would clash with the `jaxserve` package; that one import is
rewritten to the package the stubs live in, `server.gen.jaxserve.v1`.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(REPO, "server", "proto")
GEN_ROOT = os.path.join(REPO, "server", "gen")
PROTOS = ("jaxserve/v1/jaxserve.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_GEN_PACKAGE = "server.gen"


def generated_files(proto: str) -> list[str]:
    """Paths, relative to the output folder, of the files generated from one proto."""
    stem = proto[:-len(".proto")]
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def generate(out_dir: str = GEN_ROOT) -> list[str]:
    """Runs protoc over PROTOS into out_dir; returns the paths written (relative to out_dir)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for proto in PROTOS:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        package = os.path.dirname(proto).replace("/", ".")
        grpc_module = os.path.join(out_dir, proto[:-len(".proto")] + "_pb2_grpc.py")
        with open(grpc_module) as f:
            text = f.read()
        text = text.replace(f"from {package} import", f"from {_GEN_PACKAGE}.{package} import")
        with open(grpc_module, "w") as f:
            f.write(text)
        written += generated_files(proto)
    return written


def main(argv: list[str]) -> None:
    out = GEN_ROOT
    for arg in argv[1:]:
        if arg.startswith("--out="):
            out = arg[len("--out="):]
        else:
            raise SystemExit(f"usage: python -m tools.generate_protos [--out=DIR]; unknown {arg!r}")
    for path in generate(out):
        print(os.path.join(out, path))


if __name__ == "__main__":
    main(sys.argv)
