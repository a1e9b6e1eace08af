#!/usr/bin/env python3
"""Chat-template renderings by transformers, for the templates of the MoE families served.

For each template in fixtures/chat_templates/ listed below, renders a set of OpenAI-style
conversations (plain, system prompts, tool definitions, tool calls with their results,
reasoning kept or dropped, template variables such as `enable_thinking`) with
`transformers.utils.chat_template_utils.render_jinja_template` — the function behind
`tokenizer.apply_chat_template(..., tokenize=False)` — and writes
`fixtures/chat_templates/<template>.render-cases.json`. The Rust test
`chat_template::tests::family_templates_match_transformers` renders the same cases.

Templates (each the `chat_template` of the model repository's tokenizer_config.json, verbatim):
  qwen3.jinja             Qwen3 / Qwen3-MoE (Qwen/Qwen3-30B-A3B); copy from llama.cpp's
                          models/templates
  deepseek-v3.1.jinja     DeepSeek-V3.1 (deepseek-ai/DeepSeek-V3.1); copy from llama.cpp's
                          models/templates
  olmoe-instruct.jinja    OLMoE (allenai/OLMoE-1B-7B-0924-Instruct; bos and eos both
                          <|endoftext|>). The same string is the tokenizer.chat_template that
                          allenai/OLMoE-1B-7B-0924-Instruct-GGUF embeds; taken from two independent
                          public copies (one checked against the model's tokenizer_config.json at a
                          pinned revision, one from that GGUF) that agree character for character.
                          Tulu-style, no tools: system, user and assistant turns only.
  deepseek-v2-chat.jinja  DeepSeek-V2 (deepseek-ai/DeepSeek-V2-Lite-Chat; bos
                          <｜begin▁of▁sentence｜>, eos <｜end▁of▁sentence｜>); copy from the
                          "DeepSeek-V2" case of llama.cpp's tests/test-chat-template.cpp, identical
                          to the chat_template in mlx-community/DeepSeek-V2-Lite-Chat-4bit-mlx's
                          tokenizer_config.json (a conversion of deepseek-ai/DeepSeek-V2-Lite-Chat).
                          "User: ... Assistant:", no tools. The line breaks inside its string
                          literals are real newline characters, as the published JSON encodes
                          them, not backslash escapes (they render the same either way).
The two older templates take tool and reasoning cases; the two tool-less ones take what they
support: system prompts, multi-turn histories, add_generation_prompt true and false, an assistant
turn last, and content whose whitespace and non-ASCII text must pass through untouched.

    python3 tools/reference/make_chat_template_cases.py
"""

from __future__ import annotations

import json
import os

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "..", "..", "fixtures", "chat_templates")

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}]

# Tool-call arguments as OpenAI sends them: JSON strings (json.dumps' default separators, so a
# template writing them with tojson after parsing gives the same text).
ARGS = json.dumps({"city": "Paris", "unit": "c"})

PLAIN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is 2+2?"},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 °C."},
    {"role": "user", "content": "Thanks"},
]
REASONING = [
    {"role": "user", "content": "Is 7 prime?"},
    {"role": "assistant", "content": "<think>\nDivisors of 7: 1 and 7.\n</think>\n\nYes."},
    {"role": "user", "content": "And 9?"},
    {"role": "assistant", "content": "<think>\n9 = 3 × 3.\n</think>\n\nNo."},
]
# For the templates without tools or reasoning.
ASSISTANT_LAST = PLAIN + [{"role": "assistant", "content": "4."}]
SINGLE = [{"role": "user", "content": "Write a haiku about the sea."}]
UNTOUCHED = [
    {"role": "user", "content": "Translate:\n  «bonjour» \t"},
    {"role": "assistant", "content": " hello\n"},
    {"role": "user", "content": "And 'merci'? (ça va)"},
]
TOOLLESS_CASES = [
    ("plain", PLAIN, None, True, {}),
    ("history", PLAIN, None, False, {}),
    ("assistant-last", ASSISTANT_LAST, None, False, {}),
    ("single-user", SINGLE, None, True, {}),
    ("whitespace-unicode", UNTOUCHED, None, True, {}),
]

TEMPLATES = {
    "qwen3.jinja": {"bos_token": None, "eos_token": "<|im_end|>", "cases": [
        ("plain", PLAIN, None, True, {}),
        ("plain-no-thinking", PLAIN, None, True, {"enable_thinking": False}),
        ("history", PLAIN, None, False, {}),
        ("tools", TOOL_TURNS, TOOLS, True, {}),
        ("reasoning-kept-after-last-query", REASONING, None, False, {}),
    ]},
    "deepseek-v3.1.jinja": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "cases": [
        ("plain", PLAIN, None, True, {}),
        ("plain-thinking", PLAIN, None, True, {"thinking": True}),
        ("enable-thinking", PLAIN, None, True, {"enable_thinking": True}),
        ("tool-history", TOOL_TURNS, None, True, {}),
        ("reasoning-dropped", REASONING, None, False, {}),
    ]},
    "olmoe-instruct.jinja": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                             "cases": TOOLLESS_CASES},
    "deepseek-v2-chat.jinja": {"bos_token": "<｜begin▁of▁sentence｜>",
                               "eos_token": "<｜end▁of▁sentence｜>", "cases": TOOLLESS_CASES},
}


def main() -> None:
    for name, spec in TEMPLATES.items():
        source = open(os.path.join(DIR, name), encoding="utf-8").read()
        cases = []
        for case, messages, tools, gen, kwargs in spec["cases"]:
            extra = {k: v for k, v in (("bos_token", spec["bos_token"]), ("eos_token", spec["eos_token"])) if v}
            rendered, _ = render_jinja_template(
                conversations=[messages], tools=tools, chat_template=source,
                add_generation_prompt=gen, **extra, **kwargs)
            cases.append({"name": case, "messages": messages, "tools": tools,
                          "add_generation_prompt": gen, "kwargs": kwargs, "expected": rendered[0]})
        doc = {
            "source": f"rendered by transformers {transformers.__version__} (render_jinja_template, "
                      "as apply_chat_template(tokenize=False))",
            "template": name,
            "bos_token": spec["bos_token"],
            "eos_token": spec["eos_token"],
            "cases": cases,
        }
        out = os.path.join(DIR, name.replace(".jinja", ".render-cases.json"))
        with open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
