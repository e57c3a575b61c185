"""Text rows: LDM conditioning prompts/s (ldmclip ``TextConditioner`` vs ``transformers.CLIPTextModel``),
pooled text embeddings/s (ldmclip vs OpenCLIP ``encode_text``) and tokenizer captions/s (ldmclip vs
OpenCLIP's ``SimpleTokenizer`` and the ``transformers`` CLIP tokenizer), on Flickr8k captions.

Weights are random (nothing is downloaded) and the same on both sides of a row; timed runs use
``torch.inference_mode`` and bf16 autocast on both sides."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from .common import Profile, Row, captions, check, close_check, find_flickr8k, interleaved
from .suite_train import _device, _sync, register_openclip_config

SD1_PAD = 49407  # SD 1.x pads with end-of-text


def _encode_ctx(device: torch.device):
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def _passes(prompts: list[str], size: int, count: int) -> list[list[str]]:
    """``count`` passes of ``size`` prompts; consecutive slices (wrapping around)."""
    out = []
    for i in range(count):
        start = (i * size) % max(1, len(prompts) - size + 1)
        out.append(prompts[start:start + size])
    return out


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------
# LDM conditioning: all positions of the last layer (SD 1.x recipe)
# ----------------------------------------------------------------------------------------------------

def bench_conditioning(profile: Profile) -> list[Row]:
    import transformers

    import ldmclip
    from ldmclip.conditioning import TextConditioner
    from ldmclip.registry import load_text_tower
    from ldmclip.conditioning.export import export_transformers

    device = _device()
    name = profile.text_model
    flickr = find_flickr8k()
    torch.manual_seed(0)
    tower = load_text_tower(name, device=device).eval().requires_grad_(False)
    cond = TextConditioner.from_preset("sd1", tower, ldmclip.get_tokenizer(name)).eval()
    ctx = tower.context_length
    row = Row("conditioning", f"LDM conditioning {name} text tower, {ctx} positions, bf16", "prompts/s",
              "transformers CLIPTextModel + CLIPTokenizer", target=1.2,
              config={"model": name, "preset": "sd1", "batch": profile.cond_batch,
                      "prompts_per_repeat": profile.cond_prompts, "precision": "bf16 autocast",
                      "device": str(device), "measured": "tokenize + encode, end to end",
                      "captions": "Flickr8k" if flickr else "synthetic", "repeats": profile.repeats})
    with tempfile.TemporaryDirectory() as tmp:
        export_transformers(tower, tmp, tokenizer=ldmclip.get_tokenizer(name), pad_id=SD1_PAD)
        hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp)
        hf_model = transformers.CLIPTextModel.from_pretrained(tmp).to(device).eval()

    def hf_ids(batch: list[str]) -> torch.Tensor:
        return hf_tok(batch, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt").input_ids

    prompts = captions(profile.cond_prompts * (profile.repeats + profile.warmup) + 64, flickr)
    # numerical checks: identical ids, equal hidden states (fp32)
    sample = prompts[:64]
    ours_ids = ldmclip.get_tokenizer(name, pad_id=SD1_PAD)(sample)
    row.checks["token_ids_identical"] = check(torch.equal(ours_ids, hf_ids(sample)), prompts=len(sample))
    with torch.inference_mode():
        a = cond(sample[:4]).hidden
        b = hf_model(input_ids=hf_ids(sample[:4]).to(device)).last_hidden_state
    row.checks["hidden_equal_fp32"] = close_check(a, b, rtol=1e-4)

    passes = iter(_passes(prompts[64:], profile.cond_prompts, 2 * (profile.repeats + profile.warmup)))

    def ours() -> int:
        batch_list = _batches(next(passes), profile.cond_batch)
        with _encode_ctx(device):
            for batch in batch_list:
                _ = cond(batch).hidden
        _sync(device)
        return sum(map(len, batch_list))

    def theirs() -> int:
        batch_list = _batches(next(passes), profile.cond_batch)
        with _encode_ctx(device):
            for batch in batch_list:
                _ = hf_model(input_ids=hf_ids(batch).to(device)).last_hidden_state
        _sync(device)
        return sum(map(len, batch_list))

    rates = interleaved({"ours": ours, "theirs": theirs}, profile.repeats, profile.warmup)
    row.ours_all, row.theirs_all = rates["ours"], rates["theirs"]
    return [row.finish()]


# ----------------------------------------------------------------------------------------------------
# pooled embeddings
# ----------------------------------------------------------------------------------------------------

def bench_pooled(profile: Profile) -> list[Row]:
    import open_clip

    import ldmclip
    from ldmclip.registry import load_text_tower

    device = _device()
    name = profile.pooled_model
    flickr = find_flickr8k()
    torch.manual_seed(0)
    tower = load_text_tower(name, device=device).eval().requires_grad_(False)
    tokenizer = ldmclip.get_tokenizer(name)
    register_openclip_config(name)
    reference = open_clip.create_model(name)
    reference.visual = torch.nn.Identity()  # only the text tower is timed
    missing, unexpected = reference.load_state_dict(tower.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("visual.") or k == "logit_scale" for k in missing), missing
    reference = reference.to(device).eval()
    oc_tokenizer = open_clip.get_tokenizer(name)
    size = profile.pooled_batch
    row = Row("pooled", f"pooled text embeddings {name}, bf16", "captions/s", "OpenCLIP tokenizer + encode_text",
              target=2.0,
              config={"model": name, "batch": size, "captions_per_repeat": profile.pooled_captions,
                      "precision": "bf16 autocast", "device": str(device),
                      "measured": "tokenize + encode, end to end; ldmclip: encode_text_batched "
                                  "(length-bucketed batches, each cut to its longest caption)",
                      "captions": "Flickr8k" if flickr else "synthetic", "repeats": profile.repeats})
    texts = captions(profile.pooled_captions, flickr)

    def ours_encode(batch_texts: list[str]) -> torch.Tensor:
        return tower.encode_text_batched(tokenizer(batch_texts), batch_size=size)

    def theirs_encode(batch_texts: list[str]) -> torch.Tensor:
        return torch.cat([reference.encode_text(oc_tokenizer(b).to(device)) for b in _batches(batch_texts, size)])

    sample = texts[:32]
    row.checks["token_ids_identical"] = check(torch.equal(tokenizer(sample), oc_tokenizer(sample)))
    with torch.inference_mode():
        row.checks["embeddings_equal_fp32"] = close_check(ours_encode(sample[:16]), theirs_encode(sample[:16]),
                                                          rtol=1e-4)
    outputs = {}

    def side(key, fn):
        def go() -> int:
            with _encode_ctx(device):
                outputs[key] = fn(texts)
            _sync(device)
            return len(texts)
        return go

    rates = interleaved({"ours": side("ours", ours_encode), "theirs": side("theirs", theirs_encode)},
                        profile.repeats, profile.warmup)
    cos = torch.nn.functional.cosine_similarity(outputs["ours"].float(), outputs["theirs"].float(), dim=-1)
    row.checks["embeddings_close_bf16"] = check(float(cos.min()) >= 0.99, min_cosine=float(cos.min()))
    row.ours_all, row.theirs_all = rates["ours"], rates["theirs"]
    return [row.finish()]


# ----------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------

def bench_tokenizer(profile: Profile) -> list[Row]:
    import open_clip
    import transformers

    import ldmclip

    flickr = find_flickr8k()
    texts = captions(profile.tokenizer_captions, flickr)
    ours_tok = ldmclip.get_tokenizer("ViT-L-14")
    oc_tok = open_clip.get_tokenizer("ViT-L-14")
    with tempfile.TemporaryDirectory() as tmp:
        ours_tok.save_pretrained_files(Path(tmp))
        hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp)
    ctx = ours_tok.context_length
    batches = _batches(texts, profile.tokenizer_batch)

    def hf_call(batch):
        out = hf_tok(batch, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
        return out.input_ids * out.attention_mask  # padding as 0, OpenCLIP's convention

    ids = {}

    def side(key, fn):
        def go() -> int:
            ids[key] = [fn(b) for b in batches]
            return len(texts)
        return go

    sides = {"ours": side("ours", ours_tok), "openclip": side("openclip", oc_tok), "hf": side("hf", hf_call)}
    rates = interleaved(sides, profile.repeats, profile.warmup)
    ours_ids = torch.cat(ids["ours"])
    config = {"captions": len(texts), "source": "Flickr8k" if flickr else "synthetic",
              "batch": profile.tokenizer_batch, "context_length": ctx, "repeats": profile.repeats,
              "measured": "steady state: each tokenizer has seen the captions (word caches warm)"}
    rows = []
    for key, peer, target in (("openclip", "OpenCLIP SimpleTokenizer", 10.0),
                              ("hf", "transformers CLIPTokenizer (tokenizers)", 1.0)):
        row = Row(f"tokenizer_{key}", "tokenizer, Flickr8k captions", "captions/s", peer, target=target,
                  config=config)
        theirs_ids = torch.cat(ids[key])
        same = torch.equal(ours_ids, theirs_ids)
        row.checks["token_ids_identical"] = check(same, captions=len(texts),
                                                  differing_rows=int((ours_ids != theirs_ids).any(-1).sum())
                                                  if ours_ids.shape == theirs_ids.shape else None)
        row.ours_all, row.theirs_all = rates["ours"], rates[key]
        rows.append(row.finish())
    return rows
