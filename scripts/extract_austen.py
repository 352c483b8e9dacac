#!/usr/bin/env python3
"""Extracts Jane Austen's novels from Debian's r-cran-janeaustenr package into plain text.

The demo model's corpus (corpus/austen/) was made with:

    cd "$(mktemp -d)" && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb x
    python3 scripts/extract_austen.py x/usr/lib/R/site-library/janeaustenr/data corpus/austen

The package stores each novel as an R character vector (one element per line of the Project
Gutenberg text) in R's lazy-load database (Rdata.rdx: a gzipped index; Rdata.rdb: zlib
-compressed serialized objects). This script reads just enough of R's serialization format
(XDR, version 2 or 3) for that: no R installation needed.
"""

import gzip
import os
import struct
import sys
import zlib

NILVALUE, REFSXP, SYMSXP, LISTSXP, CHARSXP = 254, 255, 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19


class Reader:
    def __init__(self, data):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.d, self.p, self.refs = data, 2, []
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()
            self.p += n  # native encoding name

    def int(self):
        (v,) = struct.unpack_from(">i", self.d, self.p)
        self.p += 4
        return v

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.p : self.p + n].decode("utf-8", "replace")
            self.p += n
            return s
        if kind == LISTSXP:
            out = []
            while kind == LISTSXP:
                attr = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                flags = self.int()
                kind = flags & 0xFF
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind != NILVALUE:
                raise ValueError(f"unexpected pairlist end {kind}")
            return dict(out)
        if kind in (STRSXP, VECSXP, INTSXP, LGLSXP, REALSXP):
            n = self.int()
            if kind == STRSXP:
                v = [self.item() for _ in range(n)]
            elif kind == VECSXP:
                v = [self.item() for _ in range(n)]
            elif kind in (INTSXP, LGLSXP):
                v = list(struct.unpack_from(f">{n}i", self.d, self.p))
                self.p += 4 * n
            else:
                v = list(struct.unpack_from(f">{n}d", self.d, self.p))
                self.p += 8 * n
            if has_attr:
                attrs = self.item()
                names = attrs.get("names") if isinstance(attrs, dict) else None
                if names is not None:
                    return dict(zip(names, v))
            return v
        raise ValueError(f"unsupported SEXP type {kind}")


def main(data_dir, out_dir):
    index = Reader(gzip.decompress(open(os.path.join(data_dir, "Rdata.rdx"), "rb").read())).item()
    db = open(os.path.join(data_dir, "Rdata.rdb"), "rb").read()
    os.makedirs(out_dir, exist_ok=True)
    for name, (offset, length) in sorted(index["variables"].items()):
        blob = db[offset : offset + length]
        # 4-byte big-endian uncompressed length, then a zlib stream.
        lines = Reader(zlib.decompress(blob[4:])).item()
        text = "\n".join("" if l is None else l for l in lines).strip() + "\n"
        path = os.path.join(out_dir, f"{name}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{path}: {len(lines)} lines, {len(text)} characters")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
