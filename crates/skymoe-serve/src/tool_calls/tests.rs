//! Tests of the tool-call parsers (whole and streamed), tool and tool_choice reading, and the
//! schemas that force calls.

use serde_json::{json, Value};

use super::*;

/// Feed `text` in pieces of `step` bytes (on character boundaries) and collect the events.
fn stream(p: &mut ToolCallParser, text: &str, step: usize) -> Vec<ToolStreamEvent> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let mut j = (i + step).min(text.len());
        while !text.is_char_boundary(j) {
            j += 1;
        }
        out.extend(p.push(&text[i..j]));
        i = j;
    }
    out.extend(p.finish());
    out
}

/// The message streamed events add up to.
fn assemble(events: &[ToolStreamEvent]) -> (String, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for e in events {
        match e {
            ToolStreamEvent::Content(s) => content.push_str(s),
            ToolStreamEvent::ToolCallStart { index, name, id } => {
                assert_eq!(*index, calls.len());
                assert!(!id.is_empty());
                calls.push((name.clone(), String::new()));
            }
            ToolStreamEvent::ToolCallArguments { index, fragment } => {
                calls[*index].1.push_str(fragment)
            }
        }
    }
    (content, calls)
}

fn names_args(m: &ParsedMessage) -> Vec<(String, Value)> {
    m.tool_calls
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                serde_json::from_str(&c.arguments).expect("arguments are JSON"),
            )
        })
        .collect()
}

/// Parse whole and streamed at several piece sizes; all must agree.
fn check(format: ToolCallFormat, text: &str, content: Option<&str>, calls: &[(&str, Value)]) {
    let m = parse_tool_calls(format, text);
    assert_eq!(m.content.as_deref(), content, "content of {text:?}");
    let want: Vec<(String, Value)> = calls
        .iter()
        .map(|(n, a)| (n.to_string(), a.clone()))
        .collect();
    assert_eq!(names_args(&m), want, "{text:?}");
    for step in [1, 2, 3, 5, 7, 16, 1000] {
        let mut p = ToolCallParser::new(format);
        let events = stream(&mut p, text, step);
        let (c, got) = assemble(&events);
        let got: Vec<(String, Value)> = got
            .into_iter()
            .map(|(n, a)| {
                (
                    n,
                    serde_json::from_str(&a).expect("streamed arguments are JSON"),
                )
            })
            .collect();
        assert_eq!(got, want, "step {step}: {text:?}");
        let c = (!c.trim().is_empty()).then_some(c);
        assert_eq!(c.as_deref(), content, "step {step}: {text:?}");
        // The first event of each call is its start, and no content arrives inside a call.
        if !calls.is_empty() {
            assert!(events
                .iter()
                .any(|e| matches!(e, ToolStreamEvent::ToolCallStart { .. })));
        }
    }
}

#[test]
fn hermes_calls() {
    let f = ToolCallFormat::Hermes;
    check(
        f,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>",
        None,
        &[("get_weather", json!({"city": "Paris", "days": [1, 2]}))],
    );
    check(
        f,
        "Let me look.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"x\": \"}</tool_call>\"}, \"name\": \"b\"}\n</tool_call>",
        Some("Let me look.\n"),
        &[("a", json!({})), ("b", json!({"x": "}</tool_call>"}))],
    );
    // Arguments given as a JSON-encoded string, numbers at the top level, no arguments.
    check(
        f,
        "<tool_call>{\"name\": \"s\", \"arguments\": \"{\\\"q\\\": 1}\"}</tool_call>",
        None,
        &[("s", json!({"q": 1}))],
    );
    check(
        f,
        "<tool_call>{\"name\": \"n\"}</tool_call>",
        None,
        &[("n", json!({}))],
    );
    // Plain text, text with a lone '<', and a marker-like prefix at the end.
    check(f, "Hello <world> 1 < 2", Some("Hello <world> 1 < 2"), &[]);
    check(f, "almost <tool_ca", Some("almost <tool_ca"), &[]);
}

#[test]
fn hermes_malformed_calls_stay_text() {
    let f = ToolCallFormat::Hermes;
    for text in [
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "<tool_call>not json</tool_call>",
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\nno closing tag",
    ] {
        let m = parse_tool_calls(f, text);
        assert!(m.tool_calls.is_empty(), "{text}");
        assert_eq!(m.content.as_deref(), Some(text));
    }
}

#[test]
fn mistral_calls() {
    let f = ToolCallFormat::Mistral;
    check(
        f,
        "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"time\", \"arguments\": {}}]",
        None,
        &[
            ("get_weather", json!({"city": "Paris"})),
            ("time", json!({})),
        ],
    );
    // The special token dropped by decoding.
    check(
        f,
        "[{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": null}]}}]",
        None,
        &[("f", json!({"a": [1, {"b": null}]}))],
    );
    check(f, "[1, 2] is a list", Some("[1, 2] is a list"), &[]);
    check(
        f,
        "Sure. [TOOL_CALLS][{\"name\": \"g\", \"arguments\": {}}]",
        Some("Sure. "),
        &[("g", json!({}))],
    );
    let id = f.new_call_id();
    assert_eq!(id.len(), 9);
    assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
}

#[test]
fn llama3_calls() {
    let f = ToolCallFormat::Llama3Json;
    check(
        f,
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
        None,
        &[("get_weather", json!({"city": "Paris"}))],
    );
    check(
        f,
        "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}",
        None,
        &[("a", json!({"x": 1})), ("b", json!({}))],
    );
    check(f, "The answer is {x}.", Some("The answer is {x}."), &[]);
    check(f, "  Plain answer.", Some("  Plain answer."), &[]);
    let id = f.new_call_id();
    assert!(id.starts_with("call_") && id.len() == 29);
}

#[test]
fn streamed_calls_start_before_their_arguments_end() {
    let mut p = ToolCallParser::new(ToolCallFormat::Hermes);
    let mut events =
        p.push("Checking.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci");
    assert_eq!(events[0], ToolStreamEvent::Content("Checking.".into()));
    assert!(
        matches!(&events[1], ToolStreamEvent::ToolCallStart { index: 0, name, .. } if name == "get_weather")
    );
    assert_eq!(
        events[2],
        ToolStreamEvent::ToolCallArguments {
            index: 0,
            fragment: "{\"ci".into()
        }
    );
    events = p.push("ty\": \"Paris\"}}\n</tool");
    assert_eq!(
        events,
        vec![ToolStreamEvent::ToolCallArguments {
            index: 0,
            fragment: "ty\": \"Paris\"}".into()
        }]
    );
    assert!(p.push("_call>").is_empty());
    assert!(p.finish().is_empty());
    assert!(p.all_complete());
}

#[test]
fn required_output_parses_streamed_and_whole() {
    let text = "[{\"name\":\"get_weather\",\"parameters\":{\"city\":\"Oslo\"}},{\"name\":\"time\",\"parameters\":{}}]";
    let calls = parse_required_output(text, ToolCallFormat::Hermes).expect("parses");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(calls[0].arguments, "{\"city\":\"Oslo\"}");
    for step in [1, 4, 100] {
        let mut p = ToolCallParser::required(ToolCallFormat::Hermes);
        let events = stream(&mut p, text, step);
        let (content, got) = assemble(&events);
        assert_eq!(content, "");
        assert_eq!(
            got[0],
            ("get_weather".to_string(), "{\"city\":\"Oslo\"}".to_string())
        );
        assert_eq!(got[1], ("time".to_string(), "{}".to_string()));
        assert!(p.all_complete());
    }
    assert!(parse_required_output("[{\"name\": \"x\"", ToolCallFormat::Hermes).is_none());
}

#[test]
fn format_detection() {
    assert_eq!(
        ToolCallFormat::detect("{{ '<tool_call>' }}"),
        ToolCallFormat::Hermes
    );
    assert_eq!(
        ToolCallFormat::detect("{{ '[TOOL_CALLS] ' }}"),
        ToolCallFormat::Mistral
    );
    assert_eq!(
        ToolCallFormat::detect("<|start_header_id|>{{ '\"parameters\": ' }}"),
        ToolCallFormat::Llama3Json
    );
    assert_eq!(ToolCallFormat::detect("plain"), ToolCallFormat::Hermes);
}

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
        json!({"type": "function", "function": {"name": "time"}}),
    ]
}

#[test]
fn tools_and_choices_are_read_with_named_errors() {
    let defs = parse_tools(&tools()).expect("valid tools");
    assert_eq!(
        defs[1].parameters,
        json!({"type": "object", "properties": {}})
    );
    assert_eq!(parse_tool_choice(None, &defs), Ok(ToolChoice::Auto));
    assert_eq!(parse_tool_choice(None, &[]), Ok(ToolChoice::None));
    assert_eq!(
        parse_tool_choice(Some(&json!("required")), &defs),
        Ok(ToolChoice::Required)
    );
    assert_eq!(
        parse_tool_choice(
            Some(&json!({"type": "function", "function": {"name": "time"}})),
            &defs
        ),
        Ok(ToolChoice::Function("time".into()))
    );
    let e = parse_tool_choice(
        Some(&json!({"type": "function", "function": {"name": "nope"}})),
        &defs,
    )
    .expect_err("unknown tool");
    assert_eq!(e.param, "tool_choice.function.name");
    assert!(e.message.contains("nope") && e.message.contains("get_weather"));
    assert_eq!(
        parse_tool_choice(Some(&json!("sometimes")), &defs)
            .expect_err("bad")
            .param,
        "tool_choice"
    );
    assert_eq!(
        parse_tool_choice(Some(&json!("required")), &[])
            .expect_err("no tools")
            .param,
        "tool_choice"
    );
    for (bad, param) in [
        (json!([1]), "tools[0]"),
        (json!([{"type": "code"}]), "tools[0].type"),
        (json!([{"type": "function"}]), "tools[0].function"),
        (
            json!([{"type": "function", "function": {"name": "a b"}}]),
            "tools[0].function.name",
        ),
        (
            json!([{"type": "function", "function": {"name": "a", "parameters": 3}}]),
            "tools[0].function.parameters",
        ),
        (
            json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]),
            "tools[1].function.name",
        ),
    ] {
        let list = bad.as_array().cloned().unwrap_or_default();
        assert_eq!(
            parse_tools(&list).expect_err("invalid").param,
            param,
            "{bad}"
        );
    }
}

#[test]
fn required_schema_hoists_definitions() {
    let mut t = parse_tools(&tools()).expect("valid");
    t[0].parameters = json!({"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "$defs": {"Loc": {"type": "string"}}});
    let s = required_schema(&t).expect("schema");
    assert_eq!(s["$defs"]["Loc"], json!({"type": "string"}));
    assert_eq!(s["minItems"], json!(1));
    assert!(s["items"]["anyOf"][0]["properties"]["parameters"]
        .get("$defs")
        .is_none());
    t[1].parameters = json!({"type": "object", "$defs": {"Loc": {"type": "integer"}}});
    assert_eq!(
        required_schema(&t).expect_err("conflict").param,
        "tools[1].function.parameters"
    );
    let g = ToolChoice::Function("time".into())
        .grammar(&t)
        .expect("grammar");
    assert!(matches!(g, Some(Grammar::JsonSchema { .. })));
    assert_eq!(ToolChoice::Auto.grammar(&t), Ok(None));
}

#[test]
fn messages_are_prepared_for_templates() {
    let m = messages_for_template(&[
        json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "42"}),
    ]);
    assert_eq!(m[0]["content"], json!("ab"));
    assert_eq!(
        m[1]["tool_calls"][0]["function"]["arguments"],
        json!({"x": 1})
    );
    assert_eq!(m[2]["tool_call_id"], json!("call_1"));
    let p = tools_system_prompt(&tools());
    assert!(p.contains("<tools>\n{\"function\":") || p.contains("<tools>\n{\"type\":"));
    assert!(p.ends_with("</tool_call>"));
}
