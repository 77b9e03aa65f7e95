"""minimoe.checkpoints.tokenizer: tokenizer.json through `tokenizers`, special tokens from
tokenizer_config.json, and a DeepSeek-style chat template rendered with jinja2 (expected texts
written out by hand, and equal to transformers' apply_chat_template), plus the errors for
missing or inconsistent files."""

import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from minimoe.checkpoints.tokenizer import load_tokenizer  # noqa: E402
from tiny_tokenizer import ASSISTANT, BOS, CHAT_TEMPLATE, EOS, USER, save_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path)
    return path


def test_encode_decode_and_special_tokens(folder):
    tokenizer = load_tokenizer(folder)
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOS  # BOS given as a dict
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1  # trainer order
    text = "the router picks a few experts, Hello!"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id  # the post-processor adds BOS once
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    # a special token in the text is one id, never split into bytes
    assert tokenizer.encode(f"{USER}hi", add_special_tokens=False)[0] == \
        tokenizer.backend.token_to_id(USER)
    assert tokenizer.vocab_size == 300


def test_chat_template_renders_like_deepseek(folder):
    tokenizer = load_tokenizer(folder)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Who routes?"}]
    expected = f"{BOS}Be brief.{USER}Hi{ASSISTANT}Hello.{EOS}{USER}Who routes?{ASSISTANT}"
    assert tokenizer.render_chat(messages) == expected
    assert tokenizer.render_chat(messages, add_generation_prompt=False) == expected[:-len(ASSISTANT)]
    ids = tokenizer.apply_chat_template(messages)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, no second one
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.backend.token_to_id(ASSISTANT)
    assert tokenizer.decode(ids) == expected
    with pytest.raises(ValueError, match="chat template: unknown role tool"):
        tokenizer.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tokenizer.render_chat(["just a string"])


# a template that keeps only the last user message: a backwards loop left with {% break %}
LAST_USER_TEMPLATE = (
    "{{ bos_token }}{% for message in messages[::-1] %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% break %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, LAST_USER_TEMPLATE])
def test_chat_template_renders_like_transformers(folder, template):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    for generation_prompt in (True, False):
        expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        assert tokenizer.render_chat(messages, generation_prompt) == expected


def test_template_from_jinja_file_and_named_list(tmp_path):
    save_tokenizer(tmp_path / "jinja", chat_template=None, bos_as_dict=False)
    (tmp_path / "jinja" / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    assert load_tokenizer(tmp_path / "jinja").render_chat(
        [{"role": "user", "content": "a"}]) == f"{BOS}{USER}a{ASSISTANT}"
    save_tokenizer(tmp_path / "named", chat_template=[
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHAT_TEMPLATE}])
    assert load_tokenizer(tmp_path / "named").render_chat(
        [{"role": "user", "content": "b"}], add_generation_prompt=False) == f"{BOS}{USER}b"


def test_missing_and_inconsistent_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in .*empty"):
        load_tokenizer(tmp_path / "empty")
    save_tokenizer(tmp_path / "plain", chat_template=None)
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(tmp_path / "plain").render_chat([{"role": "user", "content": "x"}])
    config = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"eos_token '<\|im_end\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "plain")
    (tmp_path / "plain" / "tokenizer_config.json").write_text("{truncated")
    with pytest.raises(ValueError, match=r"plain/tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tmp_path / "plain")
    (tmp_path / "plain" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path / "plain")
