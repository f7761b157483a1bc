"""Original Stable Cascade LoRA files with train tokens (`train/train_c_lora.py`'s `train_tokens`): ReToken rows at
ids the training ADDED to the tokenizer.

The torch reference does what the original does: `tokenizer.add_tokens([token])` per `[...]` / `<...>` train
token, the table grown by one row each (the mean of the rows whose token matches the aggregation regex, zeros
without one; here through `resize_token_embeddings` with the rows set after), then ReToken ADDS its rows.
"""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_cascade_lora import sc  # noqa: F401  (the tiny Stable Cascade prior folder)

import wurst_jax as wj
from wurst_jax.lora.peft_format import LoraError

VOCAB = 49408
PROMPT = "a photo of [fernando] and <z>"
TRAIN = [["[fernando]", "^dog"], ["<z>", None]]  # ids 49408, 49409
TABLE = ("params", "text_model", "embeddings", "token_embedding", "embedding")


def retoken_file(path, ids, seed, dim=12):
    rng = np.random.default_rng(seed)
    tensors = {
        "embeddings.embeddings": rng.standard_normal((len(ids), dim), np.float32),
        "embeddings.indices": np.asarray(ids, np.int64),
    }
    save_file(tensors, str(path))
    return tensors


def torch_reference(folder, tensors, prompt):
    """(ids, hidden_states[-1], text_embeds) of the original's grown tokenizer + text encoder."""
    import re

    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    te = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder")).eval()
    table = te.text_model.embeddings.token_embedding.weight.data.clone()
    rows = []
    for token, regex in TRAIN:
        tok.add_tokens([token])
        new = torch.zeros_like(table[:1])
        if regex is not None:
            new = table[[v for k, v in tok.get_vocab().items() if re.search(regex, k)]].mean(0, keepdim=True)
        rows.append(new)
    te.resize_token_embeddings(len(tok), mean_resizing=False)  # the rows are set below
    with torch.no_grad():
        weight = te.text_model.embeddings.token_embedding.weight
        weight[VOCAB:] = torch.cat(rows)
        for i, idx in enumerate(tensors["embeddings.indices"]):  # ReToken.forward
            weight[int(idx)] += torch.from_numpy(tensors["embeddings.embeddings"][i])
        enc = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = te(enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    return enc.input_ids.numpy(), out.hidden_states[-1].numpy(), out.text_embeds.numpy()


def _table(pipe):
    tree = pipe.text.encoder.variables
    for p in TABLE:
        tree = tree[p]
    return np.asarray(tree)


def test_train_tokens_are_added_match_torch_and_unload_restores(sc, tmp_path):  # noqa: F811
    from conftest import rel_err

    folder = sc["root"] / "prior"
    pipe = wj.StableCascadePriorPipeline.from_pretrained(folder, progress=False)
    ids0 = pipe.text.tokenizer(PROMPT).input_ids
    states0, pooled0 = pipe.text.with_pooled([PROMPT])
    table0 = _table(pipe)
    tensors = retoken_file(tmp_path / "fern.safetensors", [320, VOCAB, VOCAB + 1], 0)

    pipe.load_lora_weights(tmp_path / "fern.safetensors", adapter_name="fern", train_tokens=TRAIN)
    ids = pipe.text.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="np").input_ids
    want_ids, want_states, want_pooled = torch_reference(folder, tensors, PROMPT)
    assert VOCAB in ids[0] and VOCAB + 1 in ids[0] and np.array_equal(ids, want_ids)  # one id per new token
    states, pooled = pipe.text.with_pooled([PROMPT])
    errs = rel_err(states, want_states), rel_err(pooled[:, 0], want_pooled)
    print(f"states / pooled vs torch: {errs[0]:.2e} / {errs[1]:.2e}")
    assert max(errs) <= 1e-5
    assert rel_err(states, states0) > 1e-2

    # a second adapter's own added token: its file's id 49408 is this table's row 49410, and dropping the
    # first adapter moves it to 49408 with the same embedding
    retoken_file(tmp_path / "q.safetensors", [VOCAB], 1)
    pipe.load_lora_weights(tmp_path / "q.safetensors", adapter_name="q", train_tokens=["[q]"])
    assert pipe.text.tokenizer("[q]").input_ids[1] == VOCAB + 2 and _table(pipe).shape[0] == VOCAB + 3
    q_states = pipe.text.with_pooled(["[q] [fernando]"])[0][:, :2]  # BOS and [q]: before the unloaded token
    pipe.unload_lora_weights("fern")
    assert pipe.text.tokenizer("[q]").input_ids[1] == VOCAB and _table(pipe).shape[0] == VOCAB + 1
    assert np.array_equal(pipe.text.with_pooled(["[q] [fernando]"])[0][:, :2], q_states)

    pipe.unload_lora_weights()
    assert pipe.text.tokenizer(PROMPT).input_ids == ids0
    assert np.array_equal(_table(pipe), table0)
    states1, pooled1 = pipe.text.with_pooled([PROMPT])
    assert np.array_equal(states1, states0) and np.array_equal(pooled1, pooled0)


def test_added_ids_need_their_train_tokens(sc, tmp_path):  # noqa: F811
    pipe = wj.StableCascadePriorPipeline.from_pretrained(sc["root"] / "prior", progress=False)
    table0, tok0 = _table(pipe), pipe.text.tokenizer
    retoken_file(tmp_path / "f.safetensors", [5, VOCAB], 0)
    with pytest.raises(LoraError, match=r"embeddings.indices \[49408\].*pass its train_tokens"):
        pipe.load_lora_weights(tmp_path / "f.safetensors")
    with pytest.raises(LoraError, match=r"added-token ids \[49408\] but 2 train token\(s\) add ids \[49408, 49409\]"):
        pipe.load_lora_weights(tmp_path / "f.safetensors", train_tokens=["[a]", "[b]"])
    with pytest.raises(LoraError, match="is given twice"):
        pipe.load_lora_weights(tmp_path / "f.safetensors", train_tokens=["[a]", "[a]"])
    # nothing of a refused file stays: tokenizer, table, adapters
    assert pipe.text.tokenizer is tok0 and np.array_equal(_table(pipe), table0)
    assert not any(t.adapters for t in pipe._lora().values()) and not pipe._groups()
