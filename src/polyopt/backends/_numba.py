"""numba helpers shared by the kernels that walk raw data addresses."""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic


@intrinsic
def _ptr(typingctx, addr, dtype):
    """``addr`` (int64) as a pointer to ``dtype`` elements, for ``numba.carray``."""
    if isinstance(dtype, types.DType):
        elem = dtype.dtype
    elif isinstance(dtype, types.NumberClass):
        elem = dtype.instance_type
    else:
        return None
    sig = types.CPointer(elem)(types.int64, dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen
