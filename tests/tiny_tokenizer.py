"""A tiny byte-level BPE tokenizer with DeepSeek-style special tokens and chat template, saved
as tokenizer.json + tokenizer_config.json (shared by the tokenizer and CLI tests)."""

import json
import os

BOS, EOS, USER, ASSISTANT = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                             "<｜Assistant｜>")
# DeepSeek-style: BOS, an optional system prompt, user turns after <｜User｜>, assistant turns
# after <｜Assistant｜> closed by EOS; the generation prompt is the assistant marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
CORPUS = ["hello world, the experts route every token", "mixture of experts language model",
          "the router picks a few experts for each token", "Hello! How are you today?"] * 4


def build_backend(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def save_tokenizer(folder, chat_template=CHAT_TEMPLATE, vocab_size=300, bos_as_dict=True):
    """Write tokenizer.json and tokenizer_config.json into folder; returns the vocab size."""
    os.makedirs(folder, exist_ok=True)
    backend = build_backend(vocab_size)
    backend.save(os.path.join(folder, "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": BOS, "special": True} if bos_as_dict else BOS
    config = {"add_bos_token": True, "bos_token": bos, "eos_token": EOS,
              "tokenizer_class": "LlamaTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, ensure_ascii=False)
    return backend.get_vocab_size()
