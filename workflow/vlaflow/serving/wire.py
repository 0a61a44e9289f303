"""The messages on the wire: msgpack with numpy arrays as openpi encodes them
(`openpi_client.msgpack_numpy`), so openpi's and StarVLA's websocket clients can talk to the server.
An array travels as `{b"__ndarray__": True, b"data": bytes, b"dtype": str, b"shape": list}`, a
numpy scalar as `{b"__npgeneric__": True, b"data": value, b"dtype": str}`. Only numbers travel:
arrays of objects or raw bytes are refused both ways, so nothing is ever unpickled."""

import msgpack
import numpy as np

NUMBER_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class WireError(ValueError):
    """A message that is not msgpack of the expected shape."""


def _encode(value):
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind not in NUMBER_KINDS:
        raise WireError(f"arrays of dtype {value.dtype} cannot be sent; send numbers")
    if isinstance(value, np.ndarray):
        return {b"__ndarray__": True, b"data": value.tobytes(), b"dtype": value.dtype.str, b"shape": value.shape}
    if isinstance(value, np.generic):
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    raise TypeError(f"cannot send a {type(value).__name__}")


def _decode(value: dict):
    if b"__ndarray__" in value or b"__npgeneric__" in value:
        try:
            dtype = np.dtype(value[b"dtype"])
        except (KeyError, TypeError) as error:
            raise WireError(f"an array without a valid dtype ({error})") from None
        if dtype.kind not in NUMBER_KINDS:
            raise WireError(f"arrays of dtype {dtype} are refused; send numbers")
        if b"__npgeneric__" in value:
            return dtype.type(value[b"data"])
        try:
            return np.frombuffer(value[b"data"], dtype=dtype).reshape(value[b"shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise WireError(f"an array whose data does not match its dtype and shape ({error})") from None
    return value


def pack(message) -> bytes:
    return msgpack.packb(message, default=_encode)


def unpack(data: bytes):
    if not isinstance(data, bytes):
        raise WireError("a text frame; messages are binary msgpack")
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except WireError:
        raise
    except (
        ValueError,
        msgpack.exceptions.ExtraData,
        msgpack.exceptions.FormatError,
        msgpack.exceptions.StackError,
    ) as error:
        raise WireError(f"not msgpack ({error or type(error).__name__})") from None
