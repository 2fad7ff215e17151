"""Generated gRPC stubs (tools/generate_protos.py); do not edit by hand."""
