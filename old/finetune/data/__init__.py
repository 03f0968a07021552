"""Chat data: records -> validated conversations -> token ids + labels -> batches.

`datasets` is imported only inside `build_dataset`: reading, validating and encoding work without it.
"""

from .collator import ChatCollator, PackedCollator
from .dataset import TooLongError, build_dataset
from .encoding import IGNORE, ChatEncoder, Encoded, encode_conversation, encode_conversation_info
from .packing import pack_lengths
from .records import DEFAULT_SYSTEM, DataError, LoadReport, iter_records, load_records, normalize_record
from .summary import DataSummary

__all__ = [
    "DEFAULT_SYSTEM", "IGNORE", "ChatCollator", "ChatEncoder", "DataError", "DataSummary", "Encoded",
    "LoadReport", "PackedCollator", "TooLongError", "build_dataset", "encode_conversation", "encode_conversation_info",
    "iter_records", "load_records", "normalize_record", "pack_lengths",
]
