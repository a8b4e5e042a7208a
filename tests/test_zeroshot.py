"""Zero-shot labels from class names, against transformers as the oracle.

CLIPModel and SiglipModel are built here from small configs with every weight randomized (norms,
biases, embeddings, the projections, logit scale and bias included), with tokenizer files made
here too: a byte-level BPE trained with the `tokenizers` library as CLIP's (vocab.json +
merges.txt, and the tokenizer.json transformers writes from them), and a sentencepiece Unigram
model as SigLIP's spiece.model. Checked: the token ids against transformers' own tokenizers, the
text embeddings against get_text_features, the logits against logits_per_image (one template)
and against the CLIP paper's ensemble made from transformers' parts (several), the scores
(softmax, SigLIP's sigmoid) and the top-k ids.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from pipeline.config import JobSpecError, ModelSpec, load_job_spec
from pipeline.model.checkpoints import CheckpointError, load_model
from pipeline.model.text import load_text_model
from pipeline.predict import top_k
from pipeline.zeroshot import IMAGENET80, SHORT, label_set

import helpers

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
NAMES = ["forklift", "pallet", "person", "empty shelf", "cardboard box", "safety vest"]
TEMPLATES = ["a photo of a {}.", "itap of the {}.", "a blurry photo of a {}.", "the {} in a warehouse."]


def corpus() -> list[str]:
    words = NAMES + ["photo", "warehouse", "blurry", "itap", "small", "large", "the", "of", "a", "in"]
    return [t.format(n) for t in IMAGENET80 for n in NAMES] + [" ".join(words)] * 5


def _features(out) -> torch.Tensor:
    """get_*_features: a tensor in transformers 4, an output with pooler_output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load(tmp_path, **model):
    """load_model with the engine cache in the test's folder (not the user's ~/.cache)."""
    return load_model(ModelSpec(**model), str(tmp_path / "cache"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- tokenizer files made here ------------------------------------------------------------------------


def clip_tokenizer_files(path, with_json: bool) -> dict:
    """A byte-level BPE with CLIP's pre-tokenization and `</w>`, trained here; saved as vocab.json
    + merges.txt (and, with_json, the tokenizer.json transformers' CLIPTokenizer writes)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=[], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([s.lower() for s in corpus()], trainer)
    vocab = tok.get_vocab()
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}  # last, as in OpenAI's vocab
    merges = tok.model.save(str(path))  # vocab.json, merges.txt
    (path / "vocab.json").write_text(json.dumps(vocab))
    assert merges
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(path))
    if with_json:
        hf_tok.save_pretrained(str(path))
        assert (path / "tokenizer.json").exists()
    return vocab


def siglip_spiece(path) -> int:
    """A sentencepiece Unigram model trained here, as SigLIP's spiece.model (unk 0, </s> 1)."""
    spm = pytest.importorskip("sentencepiece")
    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, vocab_size=100, hard_vocab_limit=False,
                                   model_type="unigram", unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
                                   minloglevel=2)
    (path / "spiece.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def clip_dir(path, with_json: bool = True, eos_rule: str = "eos") -> transformers.CLIPModel:
    vocab = clip_tokenizer_files(path, with_json)
    eos = vocab["<|endoftext|>"]
    text = TEXT | dict(vocab_size=len(vocab), max_position_embeddings=24, bos_token_id=vocab["<|startoftext|>"],
                       eos_token_id=2 if eos_rule == "argmax" else eos, pad_token_id=eos)
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config=text, projection_dim=24)
    hf = helpers.randomized(transformers.CLIPModel(cfg), 0.05)
    hf.save_pretrained(str(path))
    return hf


def siglip_dir(path) -> transformers.SiglipModel:
    n = siglip_spiece(path)
    hf_tok = transformers.SiglipTokenizer(vocab_file=str(path / "spiece.model"))
    hf_tok.save_pretrained(str(path))
    text = TEXT | dict(vocab_size=n, max_position_embeddings=16, pad_token_id=1, eos_token_id=1,
                       projection_size=VISION["hidden_size"])
    cfg = transformers.SiglipConfig(vision_config=VISION, text_config=text)
    hf = helpers.randomized(transformers.SiglipModel(cfg), 0.05)
    with torch.no_grad():  # near SigLIP's trained values (its init is log 10 and -10), so both matter
        hf.logit_scale.fill_(2.4)
        hf.logit_bias.fill_(-1.7)
    hf.save_pretrained(str(path))
    return hf


def hf_ids(path, family: str, prompts: list[str], context: int) -> torch.Tensor:
    cls = transformers.CLIPTokenizer if family == "clip" else transformers.SiglipTokenizer
    tok = cls.from_pretrained(str(path))
    return tok(prompts, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids


# --- text towers and tokenizers -----------------------------------------------------------------------


@pytest.mark.parametrize("files,eos_rule", [("tokenizer.json", "eos"), ("vocab+merges", "eos"),
                                            ("tokenizer.json", "argmax")])
def test_clip_text_tower_embeds_as_get_text_features(tmp_path, files, eos_rule):
    hf = clip_dir(tmp_path / "clip", with_json=files == "tokenizer.json", eos_rule=eos_rule)
    if files == "vocab+merges":
        assert not (tmp_path / "clip" / "tokenizer.json").exists()
    text = load_text_model(str(tmp_path / "clip"))
    prompts = [t.format(n) for t in TEMPLATES for n in NAMES] + ["A  Photo of a FORKLIFT!", "x " * 40]
    ids = text.tokenizer(prompts)  # (P, 24)
    assert torch.equal(ids, hf_ids(tmp_path / "clip", "clip", prompts, 24))  # the long one truncated, EOS kept
    with torch.no_grad():
        ref = _features(hf.get_text_features(input_ids=ids))  # (P, 24)
        ours = text.tower(ids)
    assert _max_diff(ours, ref) <= 1e-4
    assert text.trimmed(ids[:-1]).shape[1] < 24  # the causal tower's padding cut off, exactly:
    assert _max_diff(text.embed(prompts[:-1], batch=7), ref[:-1] / ref[:-1].norm(dim=-1, keepdim=True)) <= 1e-5
    assert text.logit_scale == pytest.approx(hf.logit_scale.exp().item(), rel=1e-6)


def test_siglip_text_tower_and_spiece_tokenizer_as_transformers(tmp_path):
    hf = siglip_dir(tmp_path / "siglip")
    text = load_text_model(str(tmp_path / "siglip"))
    prompts = [t.format(n) for t in TEMPLATES for n in NAMES] + ["A Photo, of a FORKLIFT!!", "pallet " * 30]
    ids = text.tokenizer(prompts)  # (P, 16)
    assert torch.equal(ids, hf_ids(tmp_path / "siglip", "siglip", prompts, 16))
    with torch.no_grad():
        ref = _features(hf.get_text_features(input_ids=ids))
        ours = text.tower(ids)
    assert _max_diff(ours, ref) <= 1e-4
    assert (text.logit_scale, text.logit_bias) == pytest.approx((hf.logit_scale.exp().item(), hf.logit_bias.item()))



def test_siglip_text_tower_with_a_unigram_tokenizer_json(tmp_path):
    """A tokenizer.json (as SigLIP 2's repositories carry): a Unigram trained here with its own
    pad token, padded to the context as transformers' fast tokenizer pads it."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import Unigram

    path = tmp_path / "siglip"
    path.mkdir()
    tok = Tokenizer(Unigram())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizers.Lowercase(), pre_tokenizers.Metaspace(), \
        decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                              unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))
    text = TEXT | dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=16, projection_size=48)
    hf = helpers.randomized(transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=text)),
                            0.05)
    hf.save_pretrained(str(path))
    ours = load_text_model(str(path))
    prompts = [t.format(n) for t in TEMPLATES for n in NAMES] + ["pallet " * 30]
    ids = ours.tokenizer(prompts)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), pad_token="<pad>",
                                                eos_token="</s>")
    ref_ids = fast(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids) and (ids == tok.token_to_id("<pad>")).any()
    with torch.no_grad():
        assert _max_diff(ours.tower(ids), _features(hf.get_text_features(input_ids=ids))) <= 1e-4



def open_clip_text_weights(hf) -> dict[str, torch.Tensor]:
    """transformers' CLIP text tower in open_clip's native layout (q, k, v packed; x @ projection)."""
    out = {"token_embedding.weight": hf.text_model.embeddings.token_embedding.weight,
           "positional_embedding": hf.text_model.embeddings.position_embedding.weight,
           "ln_final.weight": hf.text_model.final_layer_norm.weight, "ln_final.bias": hf.text_model.final_layer_norm.bias,
           "text_projection": hf.text_projection.weight.T, "logit_scale": hf.logit_scale}
    for i, layer in enumerate(hf.text_model.encoder.layers):
        p, a = f"transformer.resblocks.{i}.", layer.self_attn
        out |= {p + "attn.in_proj_weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                p + "attn.in_proj_bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                p + "attn.out_proj.weight": a.out_proj.weight, p + "attn.out_proj.bias": a.out_proj.bias}
        for ours, theirs in (("ln_1", layer.layer_norm1), ("ln_2", layer.layer_norm2), ("mlp.c_fc", layer.mlp.fc1),
                             ("mlp.c_proj", layer.mlp.fc2)):
            out |= {p + ours + ".weight": theirs.weight, p + ours + ".bias": theirs.bias}
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def test_open_clip_text_tower_embeds_as_transformers(tmp_path):
    """open_clip's native text tower pools at the highest token id: transformers' rule for
    eos_token_id 2, so a CLIPModel with that config is its oracle."""
    from safetensors.torch import save_file

    hf = clip_dir(tmp_path / "oc", eos_rule="argmax")
    (tmp_path / "oc" / "config.json").unlink()
    save_file(open_clip_text_weights(hf), str(tmp_path / "oc" / "open_clip_model.safetensors"))
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "quick_gelu": True, "text_cfg": {"context_length": 24, "width": 32, "heads": 4, "layers": 2}}}))
    text = load_text_model(str(tmp_path / "oc"))
    prompts = [t.format(n) for t in TEMPLATES for n in NAMES]
    ids = text.tokenizer(prompts)
    assert torch.equal(ids, hf_ids(tmp_path / "oc", "clip", prompts, 24))
    with torch.no_grad():
        assert _max_diff(text.tower(ids), _features(hf.get_text_features(input_ids=ids))) <= 1e-4
    assert text.logit_scale == pytest.approx(hf.logit_scale.exp().item(), rel=1e-6)


# --- the label set folded into the head ---------------------------------------------------------------


def _oracle_logits(hf, path, family: str, x: torch.Tensor, templates: list[str], context: int) -> torch.Tensor:
    """transformers' logits for the CLIP paper's ensemble: per name, its prompts' normalized
    get_text_features averaged and normalized; then scale * cosine (+ bias)."""
    with torch.no_grad():
        img = _features(hf.get_image_features(pixel_values=x))
        img = img / img.norm(dim=-1, keepdim=True)  # (B, E)
        names = []
        for n in NAMES:
            t = _features(hf.get_text_features(input_ids=hf_ids(path, family, [t.format(n) for t in templates],
                                                                  context)))
            t = t / t.norm(dim=-1, keepdim=True)
            m = t.mean(0)
            names.append(m / m.norm())
        logits = hf.logit_scale.exp() * img @ torch.stack(names).T  # (B, C)
        return logits + hf.logit_bias if family == "siglip" else logits


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_class_names_give_the_logits_scores_and_top_k_of_transformers(tmp_path, family):
    path = tmp_path / family
    hf = clip_dir(path) if family == "clip" else siglip_dir(path)
    context = 24 if family == "clip" else 16
    x = torch.randn(5, 3, 32, 32)
    for templates in (TEMPLATES[:1], TEMPLATES, list(SHORT)):
        ckpt = _load(tmp_path, checkpoint=str(path), class_names=NAMES, prompts=templates)
        assert ckpt.labels == NAMES and ckpt.config.num_classes == len(NAMES)
        assert ckpt.config.scores == ("softmax" if family == "clip" else "sigmoid")
        with torch.no_grad():
            emb, logits = ckpt.build()(x)  # (B, E), (B, C)
        ref = _oracle_logits(hf, path, family, x, templates, context)
        assert _max_diff(logits, ref) <= 1e-4, templates
        if len(templates) == 1:  # one prompt per name: transformers' own logits_per_image
            ids = hf_ids(path, family, [templates[0].format(n) for n in NAMES], context)
            with torch.no_grad():
                per_image = hf(input_ids=ids, pixel_values=x).logits_per_image  # (B, C)
            assert _max_diff(logits, per_image) <= 1e-4
        cols = top_k(logits.numpy(), 3, ckpt.labels, has_head=True, scores=ckpt.config.scores)
        probs = ref.softmax(-1) if family == "clip" else torch.sigmoid(ref)
        want = probs.argsort(dim=-1, descending=True, stable=True)[:, :3]
        assert cols["topk_ids"].to_pylist() == want.tolist()
        got = np.asarray(cols["topk_scores"].to_pylist())
        assert np.abs(got - probs.gather(1, want).numpy()).max() <= 1e-5
        assert cols["topk_labels"].to_pylist() == [[NAMES[j] for j in row] for row in want.tolist()]
    if family == "siglip":  # per-class sigmoids: a row need not sum to 1
        assert not np.allclose(torch.sigmoid(logits).sum(-1).numpy(), 1.0, atol=1e-3)


def test_label_set_from_files_templates_and_a_name_with_its_own_prompts(tmp_path):
    (tmp_path / "names.txt").write_text("forklift\n\npallet\n  person  \n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\nart of the {}.\n")
    ls = label_set(str(tmp_path / "names.txt"), str(tmp_path / "templates.txt"))
    assert ls.names == ("forklift", "pallet", "person")
    assert ls.prompts[2] == ("a photo of a person.", "art of the person.")
    ls = label_set(["pallet", {"empty shelf": ["a shelf with nothing on it", "an empty {} in a shop"]}], "photo")
    assert ls.prompts == (("a photo of a pallet.",), ("a shelf with nothing on it", "an empty empty shelf in a shop"))
    assert len(IMAGENET80) == 80 == len(set(IMAGENET80)) and len(label_set(["x"], "imagenet80").prompts[0]) == 80


def _spec(model: dict) -> dict:
    return {"source": {"uri": "/tmp/in"}, "output": {"uri": "/tmp/out"}, "model": model}


@pytest.mark.parametrize("model,message", [
    ({"class_names": []}, "empty"),
    ({"class_names": ["cat", "dog", "Cat"]}, "duplicate class name 'Cat'"),
    ({"class_names": ["cat"], "prompts": ["a photo of a cat"]}, "has no {} for the class name"),
    ({"class_names": ["cat"], "labels": "/tmp/labels.txt"}, "model.labels cannot be given"),
    ({"class_names": ["cat"], "pooling": "gap"}, "model.pooling cannot be given"),
    ({"class_names": ["cat"], "checkpoint": None, "arch": "vit_ti_16"}, "not random weights"),
    ({"class_names": [{"cat": []}]}, "empty list of prompts"),
])
def test_bad_label_sets_are_refused_in_the_spec(model, message):
    with pytest.raises(JobSpecError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_job_spec(data=_spec(model))


def test_label_set_files_are_made_absolute_for_the_actors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = load_job_spec(data=_spec({"class_names": "names.txt", "prompts": "templates.txt"})).model
    assert (m.class_names, m.prompts) == (str(tmp_path / "names.txt"), str(tmp_path / "templates.txt"))
    assert load_job_spec(data=_spec({"class_names": "names.txt", "prompts": "short"})).model.prompts == "short"


def test_checkpoints_without_a_text_tower_or_tokenizer_or_with_a_head_are_refused(tmp_path):
    vision = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(str(tmp_path / "tower"))
    with pytest.raises(CheckpointError, match="no text tower"):
        _load(tmp_path, checkpoint=str(tmp_path / "tower"), class_names=["cat"])
    hf = transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT | {"vocab_size": 64}))
    hf.save_pretrained(str(tmp_path / "bare"))  # no tokenizer files beside it
    with pytest.raises(CheckpointError, match="no tokenizer"):
        _load(tmp_path, checkpoint=str(tmp_path / "bare"), class_names=["cat"])
    with pytest.raises(CheckpointError, match="trained head"):
        _load(tmp_path, checkpoint="builtin:digits", class_names=["zero", "one"])
    (tmp_path / "names.txt").write_text("cat\ndog\nCAT\n")  # a file's duplicates: found at load
    clip_dir(tmp_path / "clip")
    with pytest.raises(ValueError, match="duplicate class name 'CAT'"):
        _load(tmp_path, checkpoint=str(tmp_path / "clip"), class_names=str(tmp_path / "names.txt"))


def test_model_id_covers_the_label_set(tmp_path):
    clip_dir(tmp_path / "clip")
    ids = {_load(tmp_path, checkpoint=str(tmp_path / "clip"), class_names=names, prompts=prompts).model_id
           for names, prompts in ((NAMES, "photo"), (NAMES[:3], "photo"), (NAMES, "short"))}
    assert len(ids) == 3



def test_text_embeddings_are_computed_once_then_read_from_the_engine_cache(tmp_path):
    from pipeline.model.checkpoints import load_checkpoint
    from pipeline.zeroshot import text_embeddings

    clip_dir(tmp_path / "clip")
    image = load_checkpoint(str(tmp_path / "clip"))
    text = load_text_model(str(tmp_path / "clip"))
    cache = str(tmp_path / "cache")
    first, status1 = text_embeddings(image, text, label_set(NAMES, TEMPLATES), cache)
    again, status2 = text_embeddings(image, text, label_set(NAMES, TEMPLATES), cache)
    assert (status1, status2) == ("built", "hit") and torch.equal(first, again)
    assert first.shape == (len(NAMES), 24) and torch.allclose(first.norm(dim=-1), torch.ones(len(NAMES)))
    # another template, another tokenizer: other keys, computed anew
    _, status3 = text_embeddings(image, text, label_set(NAMES, TEMPLATES[:2]), cache)
    text.tokenizer.digest = "0" * 64
    _, status4 = text_embeddings(image, text, label_set(NAMES, TEMPLATES), cache)
    assert (status3, status4) == ("built", "built")
    assert len(list((tmp_path / "cache").glob("text-embeddings-*.json"))) == 3
    # the folded checkpoint reads them from the cache: same head as computed
    ckpt = load_model(ModelSpec(checkpoint=str(tmp_path / "clip"), class_names=NAMES, prompts=TEMPLATES), cache)
    assert torch.allclose(ckpt.state_dict["head.weight"], text.logit_scale * first)



def test_the_folded_head_runs_on_the_onnx_engine_as_on_torch(tmp_path):
    """The label set is weights of the head: an exported graph carries it (and the normalization)."""
    pytest.importorskip("onnxruntime")
    from pipeline.engines.build import build_engine

    siglip_dir(tmp_path / "siglip")
    ckpt = _load(tmp_path, checkpoint=str(tmp_path / "siglip"), class_names=NAMES, prompts="short")
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    (e1, l1), (e2, l2) = (build_engine(ckpt, b, "fp32", "cpu", 1, max_batch=4, cache_uri=str(tmp_path / "cache"))
                          .engine.run(images) for b in ("torch", "onnx"))
    assert l1.shape == (4, len(NAMES)) and np.abs(l1 - l2).max() <= 1e-4 and np.abs(e1 - e2).max() <= 1e-4


# --- end to end ---------------------------------------------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vitpipe_run_labels_real_jpegs_with_the_users_names(ray_cluster, tmp_path, family):
    """`vitpipe run` with model.class_names on real JPEG crops: the top-k labels are the user's
    names, and the scores are transformers' on the same pixels (CLIP's softmax, SigLIP's
    sigmoid); a second run takes the text embeddings from the engine cache."""
    import duckdb
    from test_families_run import _processor, photos

    from pipeline.config import JobSpec
    from pipeline.decode import decode_image
    from pipeline.demo import write_shards
    from pipeline.model.checkpoints import load_checkpoint
    from pipeline.runner import run_job

    path, scores_kind = tmp_path / family, "softmax" if family == "clip" else "sigmoid"
    if family == "clip":
        hf = clip_dir(path)
        proc = _processor("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        hf = siglip_dir(path)
        proc = _processor("SiglipImageProcessor")(size={"height": 32, "width": 32})
    proc.save_pretrained(str(path))
    pics = photos(16)
    write_shards(pics, str(tmp_path / "in"), n_shards=2, prefix="photo")
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    def spec(out: str) -> JobSpec:
        return JobSpec.model_validate({
            "name": "zero-shot", "source": {"uri": str(tmp_path / "in")},
            "model": {"checkpoint": str(path), "class_names": str(tmp_path / "names.txt"),
                      "prompts": TEMPLATES},
            "engine": {"batch_size": 8, "cache_uri": str(tmp_path / "cache")}, "outputs": {"top_k": 3},
            "output": {"uri": str(tmp_path / out)}, "ray": {"progress": False}})

    report = run_job(spec("out"))
    entries = list((tmp_path / "cache").glob("text-embeddings-*.json"))
    assert len(entries) == 1  # computed once, by the driver; the actors read it
    made = json.loads(entries[0].read_text())["created_at"]
    again = run_job(spec("out2"))  # a second run (a nightly one): taken from the cache, not rewritten
    assert again.model_id == report.model_id and again.ok_rows == len(pics)
    assert list((tmp_path / "cache").glob("text-embeddings-*.json")) == entries
    assert json.loads(entries[0].read_text())["created_at"] == made
    assert report.ok_rows == len(pics) and (report.zero_shot, report.scores) == (True, scores_kind)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["model"]["labels"] == NAMES and manifest["model"]["scores"] == scores_kind
    rows = duckdb.sql(f"SELECT key, topk_ids, topk_scores, topk_labels FROM "
                      f"read_parquet('{tmp_path / 'out'}/part-*.parquet') ORDER BY key").fetchall()
    assert len(rows) == len(pics)
    # transformers fed the pixels the run's decode makes (the decode's own parity with the
    # processors is test_families_run.py's): what differs is the model, to 1e-4
    pre = load_checkpoint(str(path)).preprocess
    u8 = np.stack([decode_image(pics[int(k.rsplit("-", 1)[-1])][0], pre) for k, *_ in rows])  # (N, S, S, 3)
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in (pre.mean, pre.std))
    x = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - mean) / std  # (N, 3, S, S)
    logits = _oracle_logits(hf, path, family, x, TEMPLATES, 24 if family == "clip" else 16)  # (N, C)
    probs = logits.softmax(-1) if family == "clip" else torch.sigmoid(logits)
    for (_, ids, scores, labels), p in zip(rows, probs, strict=True):
        assert labels == [NAMES[j] for j in ids]
        assert np.abs(np.asarray(scores) - p[ids].numpy()).max() <= 1e-4
        top = p.sort(descending=True)
        if (top.values[:3] - top.values[1:4] > 1e-4).all():  # no near-ties: the same top-3
            assert ids == top.indices[:3].tolist()
