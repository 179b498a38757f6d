"""Small random-weight models and tokenizers made on the spot (no hub), shared by the test modules."""
from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray clients rewrite a 127.0.0.1 cluster address to the machine's outside address, where nothing listens
# (see MACHINE-NOTES); this keeps the test cluster's clients on loopback. Read when ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Without a GPU, Triton kernels run in Triton's interpreter (read when a kernel is defined, so set first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # pytest before 9 refuses to start on a filter naming a class it cannot import; the GPU machine's tests
    # (scripts/gpu-check.sh) run without pydantic
    import importlib
    try:
        importlib.import_module("pydantic.warnings")
    except ImportError:
        return
    config.addinivalue_line("filterwarnings", "ignore::pydantic.warnings.PydanticDeprecatedSince20")


def pytest_collection_modifyitems(config, items):
    """SHARDSERVE_TEST_SHARD=i/n keeps every n-th test from the i-th (0-based): scripts/gpu-check.sh runs a file's
    tests as n processes at once, since their time on a GPU machine is Triton compiling on the host's cores."""
    shard = os.environ.get("SHARDSERVE_TEST_SHARD")
    if not shard:
        return
    index, count = (int(n) for n in shard.split("/"))
    kept = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Hello, world! Streaming text one token at a time is how servers answer.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u2014 na\u00efve r\u00e9sum\u00e9s \u00fcber stra\u00dfe.",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002 \U0001F600 \U0001F680",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols !@#$%^&*()",
] * 20

SPECIALS = ["<unk>", "<s>", "</s>"]


THINKING_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]


def build_tokenizer(kind: str = "bytelevel", vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A trained BPE tokenizer: byte-level (GPT-2 style) or Metaspace with byte fallback (SentencePiece
    style, as Llama's), with <s>/</s> as BOS/EOS. "thinking": byte-level with a reasoning model's tags as tokens
    (added, not special: they stay in decoded text, as Qwen3's and DeepSeek-R1's)."""
    if kind == "thinking":
        tokenizer = build_tokenizer("bytelevel", vocab_size)
        tokenizer.add_tokens(THINKING_TAGS)
        return tokenizer
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = []
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)] if kind != "bytelevel" else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + byte_tokens,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _config(arch: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, **common)
    if arch == "llama":
        return LlamaConfig(**llama_like, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64})
    if arch == "mistral":
        return MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**{**llama_like, "tie_word_embeddings": True})
    if arch == "qwen3":
        return Qwen3Config(**llama_like, head_dim=32)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=0, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig
        # Local layers with a window of 8 around a global one: the test prompts (5 to 40 tokens) and their
        # 32 new tokens outgrow the window in prefill, in chunks over a cached prefix and in decode.
        return Gemma3TextConfig(**{**llama_like, "tie_word_embeddings": True, "num_hidden_layers": 3},
                                head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                architectures=["Gemma3ForCausalLM"])
    if arch == "gemma2":
        from transformers import Gemma2Config
        # soft-capped logits low enough that the cap bends them (random weights give scores of a few units)
        return Gemma2Config(**{**llama_like, "tie_word_embeddings": True, "num_hidden_layers": 3},
                            head_dim=32, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=2.0,
                            final_logit_softcapping=10.0,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(**{**llama_like, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3_moe":  # a sparse layer (8 experts, top 2, renormalised) and a dense one
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig(**llama_like, head_dim=32, moe_intermediate_size=32, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
    if arch == "qwen2_moe":  # top 3 of 8, not renormalised, and a gated shared expert
        from transformers import Qwen2MoeConfig
        return Qwen2MoeConfig(**llama_like, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              num_experts=8, num_experts_per_tok=3)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gemma3", "gemma2", "mixtral", "qwen3_moe",
         "qwen2_moe"]


def make_model_dir(path, arch: str, tokenizer_kind: str = "bytelevel", seed: int = 0, **config_overrides) -> str:
    from transformers import AutoModelForCausalLM
    tokenizer = build_tokenizer(tokenizer_kind)
    config = _config(arch, len(tokenizer))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch in ("gemma3", "gemma2"):  # norms start as (1 + 0): make each one different, so none stands in for another
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.randn_like(p) * 0.5)
    # Random init gives near-uniform logits; widen them so greedy choices are far from ties.
    return save_widened(model, tokenizer, path, 3.0)


def save_widened(model, tokenizer, path, factor: float) -> str:
    """Save a random model with its matrices (and stacks of experts' matrices) scaled by `factor`, and its
    tokenizer, into `path`."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> directory of a random model, created once per test session."""
    cache: dict[str, str] = {}

    def get(arch: str, tokenizer_kind: str = "bytelevel", **config_overrides) -> str:
        key = "-".join([arch, tokenizer_kind] + [f"{k}={v}" for k, v in sorted(config_overrides.items())])
        if key not in cache:
            cache[key] = make_model_dir(tmp_path_factory.mktemp(key), arch, tokenizer_kind, **config_overrides)
        return cache[key]
    return get


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "gate", "shared_expert_gate", "w1", "w2", "w3")  # the last: a mixture of experts' routers, experts


def make_lora_dir(path, model_dir: str, targets=LORA_TARGETS, rank: int = 4, alpha: float = 8, seed: int = 1,
                  **config) -> str:
    """A PEFT LoRA adapter of random weights (B too: a trained adapter's B is not zero) for the Llama-style model
    in `model_dir`, as PEFT saves one; a mixture of experts' experts get a pair per expert and projection, as PEFT
    made them on transformers 4."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import AutoConfig

    from shardserve.lora.adapter import target_shapes
    hf = AutoConfig.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors, names = {}, set()
    for layer in range(hf.num_hidden_layers):
        for module, target in target_shapes(hf, layer).items():
            if module.rpartition(".")[2] not in targets or target.experts:
                continue
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, target.in_features, generator=generator) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(target.out_features, rank, generator=generator) * 0.1
            names.add(module.rpartition(".")[2])
    Path(path).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(path) / "adapter_model.safetensors"))
    (Path(path) / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(names), "bias": "none",
        "base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM", **config}))
    return str(path)


def make_stacked_experts_lora_dir(path, model_dir: str, seed: int = 3) -> str:
    """An adapter of a mixture of experts as PEFT makes one on transformers 5's stacked experts
    (`target_parameters`: a pair per stacked parameter, every expert's rows in it) and its linear layers
    ("all-linear"), random B included. For Mixtral PEFT adds the router and gives gate_up_proj twice the rank and
    alpha (`rank_pattern`, `alpha_pattern`), as it does to carry transformers 4's adapters over."""
    import peft
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random B is small: make the adapter matter
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    adapted.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory, model_dirs):
    """(arch, name) -> a random adapter of the arch's model: "all" (every projection, rank 4; a mixture of experts'
    experts a pair each, routers too), "qv" (q and v only, rank 8, rsLoRA's scaling), "stacked" (a mixture of
    experts' adapter as PEFT makes one on transformers 5, `make_stacked_experts_lora_dir`)."""
    cache: dict[tuple[str, str], str] = {}
    kinds = {"all": dict(seed=1), "qv": dict(targets=("q_proj", "v_proj"), rank=8, alpha=16, seed=2, use_rslora=True)}

    def get(arch: str, name: str = "all") -> str:
        if (arch, name) not in cache:
            path = tmp_path_factory.mktemp(f"lora-{arch}-{name}")
            cache[arch, name] = make_stacked_experts_lora_dir(path, model_dirs(arch)) if name == "stacked" else \
                make_lora_dir(path, model_dirs(arch), **kinds[name])
        return cache[arch, name]
    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (start-up costs seconds and ~1 GiB): a head and two more
    nodes, all on loopback, so multi-node placement is real, with the settings `shardserve serve` gives a
    cluster it starts. Yields the `ray.cluster_utils.Cluster`."""
    import ray
    from ray.cluster_utils import Cluster

    from shardserve.cluster.ray_cluster import serve_environment
    os.environ.update(serve_environment())  # as `shardserve serve` starts a cluster: HAProxy in front
    node = dict(node_ip_address="127.0.0.1", object_store_memory=100 * 2**20, include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, **node))
    for _ in range(2):
        cluster.add_node(num_cpus=1, **{k: v for k, v in node.items() if k != "include_dashboard"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# Encoders (BERT, RoBERTa, XLM-R) ------------------------------------------------------------------------

def build_wordpiece_tokenizer(vocab_size: int = 300):
    """A BERT-style tokenizer: lower-casing WordPiece, [CLS] A [SEP] (B [SEP]) with token types 0 / 1."""
    from tokenizers import processors
    from transformers import BertTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def build_roberta_tokenizer(vocab_size: int = 400):
    """A RoBERTa-style tokenizer: byte-level BPE, <s>=0 <pad>=1 </s>=2, <s> A </s></s> B </s>, no token types."""
    from tokenizers import processors
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   model_input_names=["input_ids", "attention_mask"])


def _encoder_config(arch: str, vocab: int, num_labels: int):
    from transformers import BertConfig, RobertaConfig, XLMRobertaConfig
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, num_labels=num_labels, hidden_act="gelu")
    if arch == "bert":
        return BertConfig(max_position_embeddings=128, type_vocab_size=2, pad_token_id=0, **common)
    # RoBERTa's positions start after the padding index: 66 rows hold prompts of up to 64 tokens.
    cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
    return cls(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               **common)


def make_encoder_dir(path, arch: str, head: str = "embed", num_labels: int = 1, seed: int = 0) -> str:
    """A random-weight BERT / RoBERTa / XLM-R: the bare encoder (head="embed") or a sequence classifier."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    tokenizer = build_wordpiece_tokenizer() if arch == "bert" else build_roberta_tokenizer()
    config = _encoder_config(arch, len(tokenizer), num_labels)
    torch.manual_seed(seed)
    auto = AutoModel if head == "embed" else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32)
    # Initialised at std 0.02 every token looks alike; widen the weights so outputs depend on the input.
    return save_widened(model, tokenizer, path, 5.0)


@pytest.fixture(scope="session")
def encoder_dirs(tmp_path_factory):
    """(arch, head, num_labels) -> directory of a random encoder, created once per test session."""
    cache: dict[tuple, str] = {}

    def get(arch: str, head: str = "embed", num_labels: int = 1) -> str:
        key = (arch, head, num_labels)
        if key not in cache:
            cache[key] = make_encoder_dir(tmp_path_factory.mktemp(f"{arch}-{head}-{num_labels}"), arch, head,
                                          num_labels)
        return cache[key]
    return get


def assert_close_f32(actual, expected) -> None:
    """An output of ours (list or tensor) against a reference tensor, at float32 tolerances."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected).float(),
                               rtol=1e-4, atol=2e-5)


@torch.no_grad()
def hf_last_hidden(model_dir: str, texts: list[str]) -> list[torch.Tensor]:
    """transformers' last hidden states ([tokens, hidden]) of each text, run alone."""
    from transformers import AutoModel, AutoTokenizer
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    return [model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0] for t in texts]


# The online server ------------------------------------------------------------------------------------

API_KEY = "test-key"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3's rule: enable_thinking false closes the thinking in the prompt (the answer is all content).
THINK_TEMPLATE = TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n{% if enable_thinking "
                                  "is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
ENGINE = dict(max_num_seqs=16, kv_cache_memory_bytes=1 << 26, max_model_len=256)
ST_PROMPTS = {"search_query": "query: ", "search_document": "passage: "}


@pytest.fixture(scope="session")
def minilm_st_dir(tmp_path_factory):
    """all-MiniLM-L6-v2 as a model with named prompts (for Cohere's input_type) and Matryoshka dimensions
    (for output_dimension): its files linked, its two configs rewritten."""
    import json

    from shardserve.models.source import default_embedding_model
    source, path = default_embedding_model(), tmp_path_factory.mktemp("minilm-st")
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), path / name)
    for name, changes in (("config_sentence_transformers.json", {"prompts": ST_PROMPTS}),
                          ("config.json", {"matryoshka_dimensions": [128, 256, 384]})):
        with open(os.path.join(source, name)) as f:
            config = {**json.load(f), **changes}
        os.unlink(path / name)
        (path / name).write_text(json.dumps(config))
    return str(path)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lora_resolver_dir(tmp_path_factory):
    """The session app's LoRA resolver folder (vLLM's VLLM_LORA_RESOLVER_CACHE_DIR): empty until a test adds to it."""
    return tmp_path_factory.mktemp("lora-resolver")


@pytest.fixture(scope="session")
def server(ray_cluster, model_dirs, encoder_dirs, minilm_st_dir, lora_dirs, lora_resolver_dir):
    """One Serve app for the server tests, on 127.0.0.1 (its URL): a random Llama as "tiny" (reading "auto" tool
    calls in hermes' format, and with a LoRA adapter served as "tiny-lora"; more adapters can be loaded at run
    time, or found in `lora_resolver_dir`) and as "tiny-tp2" (two
    tensor-parallel workers, no tool-call parser),
    all-MiniLM-L6-v2 as "minilm" and, with prompts and Matryoshka dimensions, as "minilm-st", a random BERT
    cross-encoder "cross" and a 3-label BERT "classifier"."""
    from ray import serve

    from shardserve.models.source import default_embedding_model
    from shardserve.router.app import build_app
    from shardserve.router.spec import ModelSpec

    port = _free_port()
    common = dict(model=model_dirs("llama"), chat_template=TEMPLATE, enable_prompt_embeds=True, dtype="float32",
                  num_cpus=0.5, num_cpus_per_worker=0.5, **ENGINE)
    specs = [ModelSpec(served_model_name="tiny", enable_prompt_tokens_details=True, enable_auto_tool_choice=True,
                       tool_call_parser="hermes", enable_lora=True,
                       lora_modules={"tiny-lora": lora_dirs("llama", "all")}, **common),
             ModelSpec(served_model_name="tiny-tp2", tensor_parallel_size=2, **common),
             ModelSpec(model=default_embedding_model(), served_model_name="minilm", num_cpus=0.25),
             ModelSpec(model=minilm_st_dir, served_model_name="minilm-st", num_cpus=0.25),
             ModelSpec(model=encoder_dirs("bert", "classify", 1), served_model_name="cross", num_cpus=0.25),
             ModelSpec(model=encoder_dirs("bert", "classify", 3), served_model_name="classifier", num_cpus=0.25)]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(specs, api_key=API_KEY, allow_runtime_lora_updating=True,
                    lora_resolver_cache_dir=str(lora_resolver_dir))
    serve.run(app, name="shardserve", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.delete("shardserve")
    serve.shutdown()
