"""``seq2serve import-hf``: small random MarianMT and BART models built with ``transformers``
(tokenizers trained here), imported, exported and compared with ``transformers`` itself:
logits (PyTorch and ONNX), greedy generation through the serving engine, tokenization."""

from __future__ import annotations

import importlib.util
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from tokenizers import Tokenizer  # noqa: E402

from seq2serve.cli import main as cli_main  # noqa: E402
from seq2serve.engine.bundle import load_bundle  # noqa: E402
from seq2serve.engine.generation import (  # noqa: E402
    DecodeBatch,
    SamplingParams,
    run_to_completion,
)
from seq2serve.engine.runtime import OnnxBackend  # noqa: E402
from seq2serve.export.bundle import export_bundle  # noqa: E402
from seq2serve.hf.convert import UnsupportedModel, config_from_hf, import_hf  # noqa: E402
from seq2serve.hf.tokenizer import load_hf_tokenizer  # noqa: E402
from seq2serve.model.checkpoint import load_model  # noqa: E402

WORDS = {  # words per language, space-separated
    "en": "the house is small and green we like to read books every day",
    "fr": "le café était fermé à côté du théâtre où élève garçon façade",
    "de": "die Bücher über Straßen sind schön und größer als Äpfel",
    "ru": "привет мир книга дом большой маленький читать сегодня",
    "ja": "東京 日本語 大学 学生 電車 天気 今日 明日",
    "el": "καλημέρα κόσμε σπίτι βιβλίο",
}
EMOJI = ["😀", "🎉", "👍🏽", "🇫🇷", "❤️"]


def lines(n: int, seed: int, languages: tuple[str, ...] = tuple(WORDS)) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = WORDS[rng.choice(languages)].split()
        line = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        if rng.random() < 0.3:
            line = line[0].upper() + line[1:] + rng.choice([".", "!", "?", ","])
        out.append(line)
    return out


def probe_strings() -> list[str]:
    """Text the tokenizers must agree on: ordinary lines, then the awkward cases."""
    rng = random.Random(7)
    probes = lines(250, seed=99)
    for line in lines(60, seed=5):
        words = line.split()
        words.insert(rng.randrange(len(words) + 1), rng.choice(EMOJI))
        probes.append(" ".join(words))
    probes += [
        "",
        " ",
        "  leading and trailing  ",
        "double  space",
        "tab\tand\nnewline",
        "ünïcödé ñ ç",
        "Straße",
        "中文 العربية עברית हिन्दी",
        "👍🏽👍🏽 emoji run",
        "</s> inside",
        "a</s>b",
        "<unk>",
        "1234 5678.90",
        "\u00e9 vs e\u0301",  # composed vs decomposed: the normalizer must agree
        "ｆｕｌｌｗｉｄｔｈ",
    ]
    return probes


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that the layers decide the output, biases non-zero (every
    parameter must matter for the comparison to mean anything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (p if "weight" in name else 0))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape) * 0.1)


GENERATION = dict(  # plain greedy, nothing forced, as seq2serve's engine decodes
    forced_bos_token_id=None, forced_eos_token_id=None, bad_words_ids=None, num_beams=1
)


def build_marian(out: Path) -> Path:
    """A Marian-style model: two SentencePiece models (source and target trained on different
    text, so the target has pieces the source lacks) and one shared vocab.json."""
    import sentencepiece as spm

    work = out / "spm"
    work.mkdir(parents=True)
    for name, langs, seed, size in (
        ("source", tuple(WORDS), 1, 300),
        ("target", ("de", "fr", "ru", "ja"), 2, 240),
    ):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines(600, seed, langs)),
            model_prefix=str(work / name),
            vocab_size=size,
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,  # the generated text is small: take what it has
            minloglevel=2,
        )
    from seq2serve.hf.reference import marian_config, shared_pieces

    models = [work / "source.model", work / "target.model"]
    pieces = shared_pieces(models, ["</s>", "<unk>", ">>fr<<", ">>de<<"])
    hf_dir = out / "marian"
    cfg = marian_config(work, hf_dir, pieces, 32, 2, 4, 64, max_positions=64)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(cfg).eval()
    randomize(model, seed=1)
    model.save_pretrained(str(hf_dir))
    return hf_dir


def build_bart(out: Path, with_tokenizer_json: bool = True) -> Path:
    """A BART-style model with a byte-level BPE trained here."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        lines(600, seed=3),
        vocab_size=500,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    work = out / "bpe"
    work.mkdir(parents=True)
    bpe.save_model(str(work))
    tok = transformers.BartTokenizer(
        vocab=str(work / "vocab.json"), merges=str(work / "merges.txt")
    )
    hf_dir = out / "bart"
    tok.save_pretrained(str(hf_dir))
    if not with_tokenizer_json:
        (hf_dir / "tokenizer.json").unlink()
        for name in ("vocab.json", "merges.txt"):
            (hf_dir / name).write_bytes((work / name).read_bytes())
    cfg = transformers.BartConfig(
        vocab_size=bpe.get_vocab_size(),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        activation_function="gelu",
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        **GENERATION,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    randomize(model, seed=2)
    model.save_pretrained(str(hf_dir))
    return hf_dir


@pytest.fixture(scope="module", params=["marian", "bart"])
def imported(request, tmp_path_factory) -> dict:
    """One architecture, end to end: HF dir, imported checkpoint, exported bundle (its fp32
    step graph's LM head screened, as an opus-mt-sized model's is: greedy tokens must still
    be transformers')."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = build_marian(root) if request.param == "marian" else build_bart(root)
    ckpt = root / "ckpt"
    assert cli_main(["import-hf", str(hf_dir), "--out", str(ckpt)]) == 0
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, screen=True)
    return {
        "kind": request.param,
        "hf_dir": hf_dir,
        "ckpt": ckpt,
        "bundle": bundle,
        "hf_model": transformers.AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir)).eval(),
        "hf_tokenizer": load_hf_tokenizer(hf_dir),
    }


SOURCES = [
    "the house is small and green",
    "привет мир",
    "le café était fermé à côté du théâtre où élève garçon",
]


def test_tokenization_matches_transformers(imported) -> None:
    ours = Tokenizer.from_file(str(imported["ckpt"] / "tokenizer.json"))
    theirs = imported["hf_tokenizer"]
    probes = probe_strings()
    if imported["kind"] == "marian":
        probes += [">>fr<< le café", ">>de<<die Bücher"]
    mismatched = [
        (text, ours.encode(text).ids, theirs(text).input_ids)
        for text in probes
        if ours.encode(text).ids != theirs(text).input_ids
    ]
    assert not mismatched, mismatched[:5]
    for text in probes[:100]:  # decoding of real text round-trips the same way
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def _hf_logits(imported: dict, padded: bool) -> tuple[dict, torch.Tensor]:
    tok = imported["hf_tokenizer"]
    texts = SOURCES if padded else SOURCES[:1]
    enc = tok(texts, return_tensors="pt", padding=True)
    start = imported["hf_model"].config.decoder_start_token_id
    gen = torch.Generator().manual_seed(0)
    dec = torch.randint(5, 100, (len(texts), 6), generator=gen)
    dec[:, 0] = start
    dec_mask = torch.ones_like(dec)
    if padded:
        dec_mask[1, 4:] = 0  # a shorter target row: only its real places are compared
    with torch.no_grad():
        out = imported["hf_model"](
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            decoder_input_ids=dec,
            decoder_attention_mask=dec_mask,
        )
    batch = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "decoder_input_ids": dec,
        "decoder_attention_mask": dec_mask,
    }
    return batch, out.logits


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(imported, padded) -> None:
    batch, expected = _hf_logits(imported, padded)
    real = batch["decoder_attention_mask"].bool()
    model, _ = load_model(imported["ckpt"])
    with torch.no_grad():
        ours = model(**batch).logits
    assert (ours - expected)[real].abs().max().item() <= 1e-4

    backend = OnnxBackend(load_bundle(imported["bundle"]))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    encoded = backend.encode(ids, mask)
    dec = batch["decoder_input_ids"].numpy()
    b, t = dec.shape
    cfg = backend.config
    past = [np.zeros((b, cfg.n_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_decoder_layers)
    out = backend.decode(
        dec,
        np.broadcast_to(np.arange(t), (b, t)).astype(np.int64),
        batch["decoder_attention_mask"].numpy(),
        mask,
        past,
        encoded.cross,
    )
    diff = np.abs(out.logits - expected.numpy())[real.numpy()]
    assert diff.max() <= 1e-4


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_matches_transformers(imported, padded) -> None:
    tok = imported["hf_tokenizer"]
    texts = SOURCES if padded else SOURCES[1:2]
    enc = tok(texts, return_tensors="pt", padding=True)
    new_tokens = 20
    with torch.no_grad():
        generated = imported["hf_model"].generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            **GENERATION,
        )
    cfg = imported["hf_model"].config
    expected = []
    for row in generated.tolist():
        row = row[1:]  # the decoder start token
        if cfg.eos_token_id in row:
            row = row[: row.index(cfg.eos_token_id) + 1]
        expected.append(row)

    bundle = load_bundle(imported["bundle"])
    assert bundle.screened
    batch = DecodeBatch(OnnxBackend(bundle), bundle.tokenizer)
    params = SamplingParams(max_new_tokens=new_tokens)
    seqs = [batch.new_sequence(bundle.tokenizer.encode(t).ids, params) for t in texts]
    run_to_completion(batch, seqs)
    assert [s.generated for s in seqs] == expected
    assert any(len(row) > 3 for row in expected)  # the comparison covers real decoding


def test_bart_from_vocab_and_merges(tmp_path) -> None:
    """Without tokenizer.json, the byte-level BPE is rebuilt from vocab.json + merges.txt."""
    hf_dir = build_bart(tmp_path, with_tokenizer_json=False)
    assert not (hf_dir / "tokenizer.json").exists()
    import_hf(hf_dir, tmp_path / "ckpt")
    ours = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in probe_strings()[::5]:
        assert ours.encode(text).ids == theirs(text).input_ids, text


BASE = {
    "model_type": "bart",
    "architectures": ["BartForConditionalGeneration"],
    "vocab_size": 100,
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "max_position_embeddings": 32,
    "activation_function": "gelu",
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "t5"}, "model_type"),
        ({"model_type": "mbart"}, "model_type"),
        ({"architectures": ["BartForSequenceClassification"]}, "architectures"),
        ({"normalize_before": True}, "normalize_before"),
        ({"add_final_layer_norm": True}, "add_final_layer_norm"),
        ({"static_position_embeddings": True}, "static_position_embeddings"),
        ({"share_encoder_decoder_embeddings": False}, "share_encoder_decoder_embeddings"),
        ({"decoder_vocab_size": 120}, "decoder_vocab_size"),
        ({"activation_function": "tanh"}, "activation_function"),
        ({"decoder_ffn_dim": 48}, "decoder_ffn_dim"),
        ({"decoder_attention_heads": 4}, "decoder_attention_heads"),
        ({"scale_embedding": 2.0}, "scale_embedding"),
        ({"extra_pos_embeddings": 0}, "extra_pos_embeddings"),
    ],
)
def test_unsupported_configs_are_refused(change, named) -> None:
    with pytest.raises(UnsupportedModel, match=named):
        config_from_hf({**BASE, **change})


def test_plain_config_maps() -> None:
    cfg = config_from_hf(BASE)
    assert (cfg.positions, cfg.position_offset, cfg.embedding_norm, cfg.norm_first) == (
        "learned",
        2,
        True,
        False,
    )
    marian = config_from_hf(
        {**BASE, "model_type": "marian", "architectures": ["MarianMTModel"], "bos_token_id": None}
    )
    assert (marian.positions, marian.embedding_norm, marian.bos_token_id) == (
        "sinusoidal",
        False,
        2,
    )


def test_untied_head_and_bad_dirs_are_refused(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    hf_dir = build_bart(tmp_path)
    weights = load_file(str(hf_dir / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.shared.weight"] + 1.0
    save_file(weights, str(hf_dir / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match=r"lm_head\.weight"):
        import_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()  # nothing half-written

    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "normalize_before": True}))
    assert cli_main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 1
    assert "normalize_before" in capsys.readouterr().err
    assert cli_main(["import-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1


def test_a_marian_tokenizer_loads_without_the_sacremoses_advice(tmp_path) -> None:
    if importlib.util.find_spec("sacremoses") is not None:
        pytest.skip("sacremoses is installed: MarianTokenizer has no advice to give")
    hf_dir = build_marian(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_hf_tokenizer(hf_dir)
        transformers.AutoTokenizer.from_pretrained(str(hf_dir))  # the advice, unfiltered
    advice = [w for w in caught if "sacremoses" in str(w.message)]
    assert len(advice) == 1  # transformers' own call gives it; the import's does not


def test_the_reference_workload_builds_imports_and_exports(tmp_path):
    """`python -m seq2serve.hf.reference` (here with small layers): opus-mt's vocabulary size,
    a bundle that points the benchmark's peer rows at the Hugging Face directory."""
    from seq2serve.hf import reference

    bundle = reference.build(tmp_path, d_model=32, layers=1, heads=2, ffn=64)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["vocab_size"] == reference.VOCAB_SIZE
    source = json.loads((bundle / "hf_source.json").read_text())["hf_source"]
    assert Path(source) == tmp_path / "hf"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["fp32"]["max"] < 1e-4


def test_the_ctranslate2_peer_server_streams_the_greedy_tokens_of_the_same_weights(
    tmp_path,
) -> None:
    """The benchmark's FastAPI + CTranslate2 server, started as the benchmark starts it,
    streams one event per token, and the tokens are seq2serve's greedy ones: both servers
    decode the same Marian model."""
    pytest.importorskip("ctranslate2")
    import httpx
    from httpx_sse import connect_sse

    from seq2serve import bench
    from seq2serve.hf import ct2_server
    from seq2serve.hf.peers import convert_ctranslate2

    hf_dir = build_marian(tmp_path)
    # CTranslate2 drops Marian's pad row and starts decoding from a zero embedding; opus-mt's
    # pad row is zero (as the reference workload's is), the random one here is not.
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.pad_token_id] = 0.0
    model.save_pretrained(str(hf_dir))
    assert cli_main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    ct2 = convert_ctranslate2(hf_dir, tmp_path / "ct2", None)
    bundle = load_bundle(tmp_path / "bundle")
    tokenizer_file = tmp_path / "bundle" / "tokenizer.json"
    proc, url = bench.launch(lambda port: ct2_server.command(ct2, tokenizer_file, port, 1), {})
    seen: set[int] = set()
    try:
        for text in [*SOURCES, *lines(6, seed=11)]:
            body = {"inputs": text, "parameters": {"max_new_tokens": 12}, "stream": True}
            with (
                httpx.Client(base_url=url, timeout=60) as client,
                connect_sse(client, "POST", "/v1/generate", json=body) as events,
            ):
                streamed = [json.loads(e.data)["token"]["id"] for e in events.iter_sse()]
            batch = DecodeBatch(OnnxBackend(bundle), bundle.tokenizer)
            params = SamplingParams(max_new_tokens=12)
            (seq,) = run_to_completion(
                batch, [batch.new_sequence(bundle.tokenizer.encode(text).ids, params)]
            )
            # CTranslate2 does not stream the end-of-sequence token.
            ours = [t for t in seq.generated if t != bundle.config.eos_token_id]
            assert streamed == ours, text
            seen.update(streamed)
    finally:
        bench.stop_server(proc)
    assert len(seen) > 3  # real decoding: the sources lead to different tokens
