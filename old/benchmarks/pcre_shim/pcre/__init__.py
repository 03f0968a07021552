"""Stand-in for `pypcre` (import name `pcre`) for the usual-stack benchmark only.

gptqmodel 7.6.0 imports `pcre` at import time, and pypcre ships no cp312 wheel that
could travel to the GPU machine.  gptqmodel only uses `compile`, `escape`, `split`,
`Pattern`, `Flag.{MULTILINE,DOTALL,CASELESS}` (checked with grep over the 7.6.0
sdist); everything here delegates to the stdlib `re`, which accepts the same
(Perl-compatible subset of) patterns gptqmodel uses.
"""
import enum as _enum
import re as _re
from re import *  # noqa: F401,F403  (compile, search, match, fullmatch, split, sub, escape, ...)
from re import Match, Pattern, compile, escape, error, findall, finditer, fullmatch, match, purge, search, split, sub, subn  # noqa: F401

__version__ = "0.0.0+stdlib-re-shim"


class Flag(_enum.IntFlag):
    """pcre.Flag names mapped onto the stdlib `re` flag values."""

    CASELESS = _re.IGNORECASE
    IGNORECASE = _re.IGNORECASE
    MULTILINE = _re.MULTILINE
    DOTALL = _re.DOTALL
    VERBOSE = _re.VERBOSE
    EXTENDED = _re.VERBOSE
    UNICODE = _re.UNICODE
    UTF = _re.UNICODE
    ASCII = _re.ASCII


CASELESS = Flag.CASELESS
EXTENDED = Flag.EXTENDED
UTF = Flag.UTF


class PcreError(_re.error):
    pass


class PatternError(PcreError):
    pass
