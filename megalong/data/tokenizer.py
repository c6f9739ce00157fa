"""Tokenizers for preprocessing: an HF tokenizer directory or a SentencePiece ``.model`` file.

Both are wrapped in the same small interface (``encode_batch``, ``decode``, ``vocab_size``,
``eos_id``, ``bos_id``, ``fingerprint``, ``name``). Encoding never adds special tokens and treats
special-token strings that occur in the text (``</s>``) as plain text.

``fingerprint`` is a hash of the vocabulary (every piece, in id order), not of the files: a
SentencePiece model and the HF directory converted from it by :func:`save_hf_tokenizer` have the
same fingerprint, so data preprocessed with one is accepted by a model that ships the other.
The file hashes are recorded separately (``files_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # transformers >= 4.43 keeps the template apart
_PROBE_TEXT = "Hello world.\n    def f(x):\n        return x * 2  # caf\u00e9 \u65e5\u672c\u8a9e\n\tend"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the path and the fix."""


def _vocab_fingerprint(pieces: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def _files_sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class BaseTokenizer:
    """Common interface of megalong's tokenizers."""

    name: str
    path: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    fingerprint: str
    files_sha256: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def identity(self) -> dict:
        """What the data sidecar records about this tokenizer."""
        return {"name": self.name, "path": self.path, "fingerprint": self.fingerprint,
                "files_sha256": self.files_sha256, "kind": type(self).__name__}


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece ``.model`` file, encoded with sentencepiece's batch API.

    Args:
        path: the ``.model`` file.
        num_threads: threads for one ``encode_batch`` call (1 inside preprocessing workers).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 1) -> None:
        import sentencepiece as spm

        self.path = os.path.abspath(path)
        self.name = Path(path).name
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e}); pass a .model file or an HF tokenizer "
                                 "directory") from e
        self.num_threads = num_threads
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.fingerprint = _vocab_fingerprint(self.sp.id_to_piece(i) for i in range(self.vocab_size))
        self.files_sha256 = _files_sha256([Path(self.path)])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        return {"path": self.path, "num_threads": self.num_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["num_threads"])


def _special_token(cfg: dict, key: str) -> str | None:
    tok = cfg.get(key)
    if isinstance(tok, dict):  # AddedToken serialised as a dict
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


class HFTokenizer(BaseTokenizer):
    """An HF tokenizer directory with ``tokenizer.json``, encoded with the Rust ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        d = Path(path)
        self.path = os.path.abspath(d)
        self.name = d.name
        try:
            self.tk = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the Rust library raises its own exception type
            raise TokenizerError(f"{d / 'tokenizer.json'}: cannot be loaded by the tokenizers library ({e})") from e
        self.tk.encode_special_tokens = True  # "</s>" in raw text stays text
        cfg: dict = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            f = d / fname
            if f.is_file():
                cfg.update(json.loads(f.read_text(encoding="utf-8")))
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = self._token_id(_special_token(cfg, "eos_token"))
        self.bos_id = self._token_id(_special_token(cfg, "bos_token"))
        by_id = [""] * self.vocab_size
        for piece, i in vocab.items():
            by_id[i] = piece
        self.fingerprint = _vocab_fingerprint(by_id)
        self.files_sha256 = _files_sha256([d / f for f in HF_TOKENIZER_FILES if (d / f).is_file()])

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def load_tokenizer(spec: str | os.PathLike, num_threads: int = 1) -> BaseTokenizer:
    """Load an HF tokenizer directory (``tokenizer.json``) or a SentencePiece ``.model`` file.

    A directory holding only a ``tokenizer.model`` is read with SentencePiece.
    """
    p = Path(spec)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model", num_threads)
        raise TokenizerError(f"{p}: directory has neither tokenizer.json nor tokenizer.model; pass an HF tokenizer "
                             "directory or a SentencePiece .model file (tools/train_tokenizer.py makes one)")
    if p.is_file():
        return SentencePieceTokenizer(p, num_threads)
    raise TokenizerError(f"{p}: no such tokenizer file or directory; pass an HF tokenizer directory or a "
                         "SentencePiece .model file")


# --- SentencePiece model header (a few protobuf fields, read without the protobuf package) ---------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) of a serialized protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i: i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i: i + n], i + n
        elif wire == 5:
            val, i = buf[i: i + 4], i + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield num, wire, val


def sentencepiece_spec(path: str | os.PathLike) -> dict:
    """Model type and normalizer settings of a SentencePiece model (defaults as in sentencepiece's proto)."""
    spec = {"model_type": 1, "normalizer": "nmt_nfkc", "charsmap": b"", "add_dummy_prefix": True,
            "remove_extra_whitespaces": True, "escape_whitespaces": True}
    for num, _, val in _fields(Path(path).read_bytes()):
        if num == 2 and isinstance(val, bytes):  # TrainerSpec
            for n2, _, v2 in _fields(val):
                if n2 == 3:
                    spec["model_type"] = v2
        elif num == 3 and isinstance(val, bytes):  # NormalizerSpec
            names = {1: "normalizer", 2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                     5: "escape_whitespaces"}
            for n2, _, v2 in _fields(val):
                if n2 in names:
                    key = names[n2]
                    spec[key] = v2.decode() if key == "normalizer" else (v2 if key == "charsmap" else bool(v2))
    return spec


def _hf_from_sentencepiece(sp_tok: SentencePieceTokenizer):
    """Build a ``transformers.PreTrainedTokenizerFast`` equal to a SentencePiece BPE/unigram model."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp, spec = sp_tok.sp, sentencepiece_spec(sp_tok.path)
    if spec["model_type"] not in (1, 2) or not spec["escape_whitespaces"]:
        raise TokenizerError(f"{sp_tok.path}: only SentencePiece BPE and unigram models with whitespace escaping "
                             "can be converted; pass an HF tokenizer directory instead")
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    byte_fallback = any(sp.is_byte(i) for i in range(n))
    unk = sp.id_to_piece(sp.unk_id())
    if spec["model_type"] == 2:  # BPE: merges ranked by piece score, as sentencepiece applies them
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)})
        model = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    else:
        model = Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], sp.unk_id(), byte_fallback)
    tk = Tokenizer(model)
    norms = []
    if spec["charsmap"]:
        norms.append(normalizers.Precompiled(spec["charsmap"]))
    if spec["remove_extra_whitespaces"]:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norms:
        tk.normalizer = normalizers.Sequence(norms)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if spec["add_dummy_prefix"] else "never", split=False)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(dec)
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    bos = pieces[sp.bos_id()] if sp.bos_id() >= 0 else None
    eos = pieces[sp.eos_id()] if sp.eos_id() >= 0 else None
    if bos is not None:  # Llama convention: the HF tokenizer prepends BOS
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, sp.bos_id())])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk,
        pad_token=pieces[sp.pad_id()] if sp.pad_id() >= 0 else None,
        additional_special_tokens=[pieces[i] for i in special if pieces[i] not in (bos, eos, unk)],
        clean_up_tokenization_spaces=False,
    )


def save_hf_tokenizer(spec: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an HF tokenizer directory (``AutoTokenizer.from_pretrained(out_dir)`` works offline).

    An HF directory is copied (its tokenizer files and chat template); a SentencePiece model is converted (BPE or
    unigram, byte fallback, its normalizer), the ``.model`` is kept beside it as ``tokenizer.model``,
    and the conversion is checked: both must encode a probe text to the same ids.

    Returns:
        ``out_dir`` as a Path.
    """
    src = load_tokenizer(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(src, HFTokenizer):
        for f in HF_TOKENIZER_FILES + CHAT_TEMPLATE_FILES:
            if (Path(src.path) / f).is_file() and Path(src.path).resolve() != out.resolve():
                shutil.copyfile(Path(src.path) / f, out / f)
        return out
    hf = _hf_from_sentencepiece(src)
    hf.save_pretrained(str(out))
    shutil.copyfile(src.path, out / "tokenizer.model")
    check = HFTokenizer(out)
    want, got = src.encode(_PROBE_TEXT), check.encode(_PROBE_TEXT)
    if want != got or check.fingerprint != src.fingerprint:
        raise TokenizerError(f"{spec}: converted HF tokenizer in {out} does not encode like the SentencePiece model "
                             f"({got[:8]}… vs {want[:8]}…); use the .model file directly")
    return out


def train_sentencepiece(input_files: list[str | os.PathLike], model_prefix: str | os.PathLike, vocab_size: int = 4000,
                        model_type: str = "bpe", max_sentence_length: int = 1 << 14,
                        input_sentence_size: int = 2_000_000, num_threads: int = 2, seed: int = 0) -> Path:
    """Train a small SentencePiece model (byte fallback, no text normalisation) on text files.

    The model keeps text exact (identity normalizer, whitespace kept), so decode(encode(x)) == x
    for text without a leading space; ids: 0 unk, 1 bos (``<s>``), 2 eos (``</s>``), no pad.

    Returns:
        Path of the written ``MODEL_PREFIX.model``.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type={model_type!r} is not supported; use 'bpe' or 'unigram'")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=[os.fspath(f) for f in input_files], model_prefix=os.fspath(model_prefix), vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return Path(f"{os.fspath(model_prefix)}.model")


def to_array(ids: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a batch of id lists into (tokens, lengths) numpy arrays."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if not len(ids) or not lengths.sum():
        return np.zeros(0, dtype), lengths
    return np.concatenate([np.asarray(x, dtype=dtype) for x in ids if x]), lengths
