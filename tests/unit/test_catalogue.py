"""The catalogue scan: ids, kinds, formats and metadata of what lies in MODELS_DIR, and rescans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

from kernel.gguf import read_gguf_header
from service.tiers.catalogue import Catalogue, scan


def write_gguf(path: Path, arch: str = "llama", ctx: int = 2048, file_type: int = 15, pooling: bool = False) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(ctx)
    w.add_file_type(file_type)
    if pooling:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_token_list(["<s>", "</s>", "hello"])  # an array the header reader must skip
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_folder(path: Path, config: dict[str, object], *extra: str) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0" * 100)
    for name in extra:
        (path / name).write_text("{}")


def test_gguf_header_is_read_without_tensors(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", arch="qwen2", ctx=32768)
    header = read_gguf_header(tmp_path / "m.gguf")
    assert header.meta["general.architecture"] == "qwen2"
    assert header.meta["qwen2.context_length"] == 32768
    assert header.arrays["tokenizer.ggml.tokens"] == 3  # arrays are skipped: their length only
    assert header.tensors == {}  # not asked for
    assert read_gguf_header(tmp_path / "m.gguf", tensors=True).tensors == {"t": (4,)}


def test_scan_tells_models_apart(tmp_path: Path) -> None:
    write_gguf(tmp_path / "Qwen2.5-0.5B-Q4_K_M.gguf", arch="qwen2", ctx=32768, file_type=15)
    write_gguf(tmp_path / "mmproj-Qwen2.5-0.5B-f16.gguf", arch="clip", file_type=1)
    write_gguf(tmp_path / "nomic-embed.gguf", arch="nomic-bert", ctx=8192, file_type=1, pooling=True)
    for i in (1, 2):
        write_gguf(tmp_path / f"big-model-0000{i}-of-00002.gguf", arch="llama", ctx=4096)
    write_gguf(tmp_path / "partial-00001-of-00003.gguf")  # parts missing: not listed
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    write_folder(
        tmp_path / "qwen-mlx-4bit",
        {"architectures": ["Qwen2ForCausalLM"], "quantization": {"bits": 4}, "max_position_embeddings": 32768},
    )
    write_folder(tmp_path / "tiny-llama-hf", {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"})
    write_folder(tmp_path / "minilm", {"architectures": ["BertModel"], "max_position_embeddings": 512}, "modules.json")
    write_folder(tmp_path / "bge-reranker", {"architectures": ["XLMRobertaForSequenceClassification"]})
    (tmp_path / "notes").mkdir()  # a folder without config.json is not a model

    entries = scan(tmp_path)
    assert sorted(entries) == [
        "Qwen2.5-0.5B-Q4_K_M",
        "bge-reranker",
        "big-model",
        "minilm",
        "nomic-embed",
        "qwen-mlx-4bit",
        "tiny-llama-hf",
    ]
    qwen = entries["Qwen2.5-0.5B-Q4_K_M"]
    assert (qwen.kind, qwen.format, qwen.quantisation, qwen.context_length) == ("generation", "gguf", "Q4_K_M", 32768)
    assert qwen.projector and qwen.projector.endswith("mmproj-Qwen2.5-0.5B-f16.gguf")
    assert "vision" in qwen.capabilities
    assert qwen.size_bytes == sum(os.path.getsize(f) for f in qwen.files) and len(qwen.files) == 2
    big = entries["big-model"]
    assert big.path.endswith("big-model-00001-of-00002.gguf") and len(big.files) == 2
    assert (entries["nomic-embed"].kind, entries["nomic-embed"].capabilities) == ("embedding", ("embeddings",))
    mlx = entries["qwen-mlx-4bit"]
    assert (mlx.kind, mlx.format, mlx.quantisation, mlx.context_length) == ("generation", "mlx", "4bit", 32768)
    assert (entries["tiny-llama-hf"].format, entries["tiny-llama-hf"].quantisation) == ("hf", "bfloat16")
    assert (entries["minilm"].kind, entries["minilm"].format) == ("embedding", "hf")
    assert (entries["bge-reranker"].kind, entries["bge-reranker"].capabilities) == ("reranker", ("rerank",))


def test_catalogue_rescans_when_the_folder_changes(tmp_path: Path) -> None:
    catalogue = Catalogue(str(tmp_path / "models"))
    assert catalogue.entries() == {}  # missing folder
    (tmp_path / "models").mkdir()
    write_gguf(tmp_path / "models" / "a.gguf")
    assert list(catalogue.entries()) == ["a"]
    first = catalogue.entries()
    assert catalogue.entries() is first  # unchanged folder: no rescan
    write_gguf(tmp_path / "models" / "b.gguf")
    os.utime(tmp_path / "models", ns=(0, 10**9))  # coarse-mtime filesystems: make the change visible
    assert sorted(catalogue.entries()) == ["a", "b"]
    (tmp_path / "models" / "a.gguf").unlink()
    os.utime(tmp_path / "models", ns=(0, 2 * 10**9))
    assert list(catalogue.entries()) == ["b"]


def test_real_gemma_gguf(tmp_path: Path, gemma_gguf: str) -> None:
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").symlink_to(gemma_gguf)
    entry = scan(tmp_path)["gemma-3-270m-q4_k_m"]
    assert (entry.kind, entry.format, entry.quantisation, entry.context_length, entry.architecture) == (
        "generation",
        "gguf",
        "Q4_K_M",
        32768,
        "gemma3",
    )
    assert entry.size_bytes == os.path.getsize(gemma_gguf)
