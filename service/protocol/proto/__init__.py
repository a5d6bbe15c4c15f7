"""Generated gRPC stubs (committed). Regenerate after editing cellforge/v1/cellforge.proto, from this folder:

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. cellforge/v1/cellforge.proto
    sed -i 's/^from cellforge.v1 import cellforge_pb2 as/from . import cellforge_pb2 as/' cellforge/v1/cellforge_pb2_grpc.py
"""
