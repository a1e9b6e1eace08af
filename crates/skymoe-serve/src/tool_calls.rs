//! Tool calling: the tools of a request, the grammars that force a call, and the parsers that
//! find tool calls in generated text, whole or as it streams.
//!
//! Models write tool calls in their family's format:
//!
//! | format | text |
//! | --- | --- |
//! | [`ToolCallFormat::Hermes`] (Qwen2/2.5/3, Hermes, most ChatML models) | `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, repeated |
//! | [`ToolCallFormat::Mistral`] | `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]` |
//! | [`ToolCallFormat::Llama3Json`] (Llama 3.1–3.3) | `{"name": "f", "parameters": {...}}`, optionally after `<|python_tag|>`, several separated by `;` |
//!
//! [`ToolCallParser`] reads the text as it arrives and emits [`ToolStreamEvent`]s in the
//! order OpenAI streams them: content, then per call one event with its id and name and
//! events with fragments of its arguments (whose concatenation is the arguments' JSON text).
//! [`parse_tool_calls`] reads a whole text.
//!
//! When `tool_choice` is `required` or names a function, the output is constrained instead:
//! to a JSON array `[{"name": ..., "parameters": {...}}, ...]` of calls to the given tools
//! ([`required_schema`]) or to the named function's arguments ([`ToolChoice::Function`]), so
//! the arguments always validate against the function's parameters.

use std::collections::BTreeMap;

use rand::Rng;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::constrained::{json_kind, Grammar};

/// The format a model family writes tool calls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Qwen, Hermes).
    Hermes,
    /// `[TOOL_CALLS][{"name": ..., "arguments": ...}]` (Mistral).
    Mistral,
    /// `{"name": ..., "parameters": ...}` (Llama 3.1 and later).
    Llama3Json,
}

impl ToolCallFormat {
    /// The format a chat template asks for, judged by the markers it writes; Hermes when it
    /// names none (also the format the built-in tool prompt teaches, see
    /// [`tools_system_prompt`]).
    pub fn detect(template_source: &str) -> Self {
        if template_source.contains("[TOOL_CALLS]") {
            ToolCallFormat::Mistral
        } else if template_source.contains("<tool_call>") {
            ToolCallFormat::Hermes
        } else if template_source.contains("<|python_tag|>")
            || (template_source.contains("<|start_header_id|>")
                && template_source.contains("\"parameters\""))
        {
            ToolCallFormat::Llama3Json
        } else {
            ToolCallFormat::Hermes
        }
    }

    /// A new tool-call id in the form the family's templates accept: Mistral's templates
    /// require 9 letters or digits; others get OpenAI's `call_` + 24 characters.
    pub fn new_call_id(self) -> String {
        const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut rng = rand::rng();
        let mut pick = |n: usize| -> String {
            (0..n)
                .map(|_| char::from(ALNUM[rng.random_range(0..ALNUM.len())]))
                .collect()
        };
        match self {
            ToolCallFormat::Mistral => pick(9),
            _ => format!("call_{}", pick(24)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tools and tool_choice

/// A function the model may call (`tools[i]` with `type: "function"`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    /// The function's name.
    pub name: String,
    /// What it does (may be empty).
    pub description: Option<String>,
    /// The JSON schema of its arguments (`{"type": "object", "properties": {}}` when absent).
    pub parameters: Value,
    /// `function.strict`: enforce the schema's keywords strictly.
    pub strict: bool,
}

/// A request error in the tools, naming the parameter (`tools[1].function.name`,
/// `tool_choice`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    /// The request parameter at fault.
    pub param: String,
    /// What is wrong.
    pub message: String,
}

impl ToolError {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        ToolError {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Read `tools` as OpenAI sends them: `[{"type": "function", "function": {"name",
/// "description", "parameters", "strict"}}]`. Names must be unique, 1–64 letters, digits,
/// `_` or `-`.
pub fn parse_tools(tools: &[Value]) -> Result<Vec<ToolDef>, ToolError> {
    let mut out: Vec<ToolDef> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        let Some(obj) = t.as_object() else {
            return Err(ToolError::new(&p, format!("`{p}` must be an object")));
        };
        match obj.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(ToolError::new(
                    format!("{p}.type"),
                    format!("`{p}.type` must be \"function\", got \"{other}\""),
                ))
            }
            None => {
                return Err(ToolError::new(
                    format!("{p}.type"),
                    format!("`{p}.type` is required and must be \"function\""),
                ))
            }
        }
        let Some(f) = obj.get("function").and_then(Value::as_object) else {
            return Err(ToolError::new(
                format!("{p}.function"),
                format!("`{p}.function` is required and must be an object"),
            ));
        };
        let name = match f.get("name") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ToolError::new(
                    format!("{p}.function.name"),
                    format!("`{p}.function.name` is required and must be a string"),
                ))
            }
        };
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(ToolError::new(
                format!("{p}.function.name"),
                format!(
                    "`{p}.function.name` must be 1 to 64 letters, digits, underscores or \
                     dashes, got {name:?}"
                ),
            ));
        }
        if out.iter().any(|d| d.name == name) {
            return Err(ToolError::new(
                format!("{p}.function.name"),
                format!("the function name {name:?} appears twice in `tools`"),
            ));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(ToolError::new(
                    format!("{p}.function.description"),
                    format!("`{p}.function.description` must be a string"),
                ))
            }
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(v) => {
                return Err(ToolError::new(
                    format!("{p}.function.parameters"),
                    format!(
                        "`{p}.function.parameters` must be a JSON schema object, not {}",
                        json_kind(v)
                    ),
                ))
            }
        };
        let strict = f.get("strict").and_then(Value::as_bool).unwrap_or(false);
        out.push(ToolDef {
            name,
            description,
            parameters,
            strict,
        });
    }
    Ok(out)
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool (the tools are still shown to the model).
    None,
    /// The model decides; calls are parsed from its text.
    Auto,
    /// The model must call one or more tools (constrained).
    Required,
    /// The model must call this function (constrained).
    Function(String),
}

/// Read `tool_choice` (`"none"`, `"auto"`, `"required"` or `{"type": "function",
/// "function": {"name": ...}}`) against the request's tools. Absent, it is `auto` with tools
/// and `none` without. Naming a function that is not among the tools is an error, as is
/// `required` or a named function without tools.
pub fn parse_tool_choice(
    choice: Option<&Value>,
    tools: &[ToolDef],
) -> Result<ToolChoice, ToolError> {
    let param = "tool_choice";
    let parsed = match choice {
        None | Some(Value::Null) => {
            return Ok(if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            })
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ToolError::new(
                    param,
                    format!(
                        "`tool_choice` must be \"none\", \"auto\", \"required\" or a named \
                         function, got \"{other}\""
                    ),
                ))
            }
        },
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ToolError::new(
                    "tool_choice.type",
                    "`tool_choice.type` must be \"function\"",
                ));
            }
            let Some(name) = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            else {
                return Err(ToolError::new(
                    "tool_choice.function.name",
                    "`tool_choice.function.name` is required and must be a string",
                ));
            };
            if !tools.iter().any(|t| t.name == name) {
                let known: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                return Err(ToolError::new(
                    "tool_choice.function.name",
                    if known.is_empty() {
                        format!("`tool_choice` names the function {name:?} but `tools` is empty")
                    } else {
                        format!(
                            "`tool_choice` names the function {name:?}, which is not in \
                             `tools` ({})",
                            known.join(", ")
                        )
                    },
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(v) => {
            return Err(ToolError::new(
                param,
                format!(
                    "`tool_choice` must be a string or an object, not {}",
                    json_kind(v)
                ),
            ))
        }
    };
    if parsed == ToolChoice::Required && tools.is_empty() {
        return Err(ToolError::new(
            param,
            "`tool_choice` is \"required\" but the request has no `tools`",
        ));
    }
    Ok(parsed)
}

impl ToolChoice {
    /// The grammar that enforces this choice over `tools`, if it is enforced (`required` and
    /// named functions).
    pub fn grammar(&self, tools: &[ToolDef]) -> Result<Option<Grammar>, ToolError> {
        match self {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            ToolChoice::Required => Ok(Some(Grammar::json_schema(
                required_schema(tools)?,
                tools.iter().any(|t| t.strict),
            ))),
            ToolChoice::Function(name) => {
                let Some(t) = tools.iter().find(|t| &t.name == name) else {
                    return Err(ToolError::new(
                        "tool_choice.function.name",
                        format!("no tool is named {name:?}"),
                    ));
                };
                Ok(Some(Grammar::json_schema(t.parameters.clone(), t.strict)))
            }
        }
    }
}

/// The JSON schema of the output under `tool_choice: "required"`: a non-empty array of
/// `{"name": <one of the tools>, "parameters": <its arguments>}`. The tools' `$defs` (and
/// `definitions`) move to the top so that their `#/$defs/...` references still resolve; two
/// tools defining the same name differently are an error.
pub fn required_schema(tools: &[ToolDef]) -> Result<Value, ToolError> {
    let mut defs: BTreeMap<String, Value> = BTreeMap::new();
    let mut variants = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let mut params = t.parameters.clone();
        if let Some(o) = params.as_object_mut() {
            for key in ["$defs", "definitions"] {
                let Some(d) = o.remove(key) else { continue };
                let Value::Object(d) = d else {
                    return Err(ToolError::new(
                        format!("tools[{i}].function.parameters"),
                        format!("`{key}` must be an object"),
                    ));
                };
                for (name, def) in d {
                    let full = format!("{key}/{name}");
                    match defs.get(&full) {
                        Some(prev) if prev != &def => {
                            return Err(ToolError::new(
                                format!("tools[{i}].function.parameters"),
                                format!(
                                    "the definition `{name}` differs from another tool's of \
                                     the same name; rename one of them"
                                ),
                            ))
                        }
                        _ => {
                            defs.insert(full, def);
                        }
                    }
                }
            }
        }
        variants.push(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": t.name},
                "parameters": params,
            },
            "required": ["name", "parameters"],
            "additionalProperties": false,
        }));
    }
    let mut schema = json!({
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": variants},
    });
    if let Some(o) = schema.as_object_mut() {
        for (full, def) in defs {
            if let Some((key, name)) = full.split_once('/') {
                let slot = o
                    .entry(key.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(m) = slot.as_object_mut() {
                    m.insert(name.to_string(), def);
                }
            }
        }
    }
    Ok(schema)
}

/// A system prompt that shows `tools` to a model whose chat template ignores them, and asks
/// for calls in the Hermes format (the prompt Qwen2.5's template writes).
pub fn tools_system_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        s.push('\n');
        s.push_str(&t.to_string());
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
         <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// OpenAI chat messages made ready for a Hugging Face chat template, as `transformers`-based
/// servers pass them: content parts joined into one string, and each assistant tool call's
/// `function.arguments` (a JSON string in OpenAI's API) turned into the object it encodes,
/// which templates write with `tojson`. Arguments that are not valid JSON stay strings.
pub fn messages_for_template(messages: &[Value]) -> Vec<Value> {
    prepare_messages(messages, true)
}

/// [`messages_for_template`] keeping each tool call's `function.arguments` the JSON string
/// the client sent, for templates that write it as text (DeepSeek's
/// `name + '<｜tool▁sep｜>' + arguments`).
pub fn messages_with_string_arguments(messages: &[Value]) -> Vec<Value> {
    prepare_messages(messages, false)
}

fn prepare_messages(messages: &[Value], parse_arguments: bool) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            let Some(o) = m.as_object_mut() else {
                return m;
            };
            if let Some(Value::Array(parts)) = o.get("content") {
                let text: String = parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                o.insert("content".to_string(), Value::String(text));
            }
            if !parse_arguments {
                return m;
            }
            if let Some(Value::Array(calls)) = o.get_mut("tool_calls") {
                for call in calls {
                    let args = call
                        .get_mut("function")
                        .and_then(|f| f.get_mut("arguments"));
                    if let Some(a) = args {
                        if let Value::String(s) = a {
                            if let Ok(v) = serde_json::from_str::<Value>(s) {
                                *a = v;
                            }
                        }
                    }
                }
            }
            m
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Parsed calls

/// One tool call found in the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    /// The call's id (`call_...`, or 9 characters for Mistral).
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

/// A message split into text and tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedMessage {
    /// The text outside the calls (`None` when there is none but whitespace).
    pub content: Option<String>,
    /// The calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

/// What the streaming parser emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolStreamEvent {
    /// Text outside tool calls.
    Content(String),
    /// A call begins (OpenAI's first delta of a call: `index`, `id`, `type`, `function.name`).
    ToolCallStart {
        /// Position of the call in the message.
        index: usize,
        /// Its id.
        id: String,
        /// The function's name.
        name: String,
    },
    /// More of a call's arguments (`function.arguments` fragment).
    ToolCallArguments {
        /// Position of the call in the message.
        index: usize,
        /// The next piece of the arguments' JSON text.
        fragment: String,
    },
}

/// Split a whole generated text into content and tool calls in `format`. Text whose calls
/// are malformed (unterminated, arguments that are not JSON) is returned whole as content.
pub fn parse_tool_calls(format: ToolCallFormat, text: &str) -> ParsedMessage {
    let mut p = ToolCallParser::new(format);
    let mut events = p.push(text);
    events.extend(p.finish());
    collect(events, p.all_complete(), text)
}

/// Assemble events into a message; `complete` false (or any arguments that do not parse)
/// gives the whole `text` as content instead.
fn collect(events: Vec<ToolStreamEvent>, complete: bool, text: &str) -> ParsedMessage {
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for e in events {
        match e {
            ToolStreamEvent::Content(s) => content.push_str(&s),
            ToolStreamEvent::ToolCallStart { id, name, .. } => calls.push(ToolCall {
                id,
                name,
                arguments: String::new(),
            }),
            ToolStreamEvent::ToolCallArguments { index, fragment } => {
                if let Some(c) = calls.get_mut(index) {
                    c.arguments.push_str(&fragment);
                }
            }
        }
    }
    let valid = complete
        && calls
            .iter()
            .all(|c| serde_json::from_str::<Value>(&c.arguments).is_ok());
    if !valid {
        return ParsedMessage {
            content: (!text.trim().is_empty()).then(|| text.to_string()),
            tool_calls: Vec::new(),
        };
    }
    ParsedMessage {
        content: (!content.trim().is_empty()).then_some(content),
        tool_calls: calls,
    }
}

/// The calls in the output of a generation constrained by [`required_schema`]: a JSON array
/// of `{"name", "parameters"}`; `None` if it does not parse (a generation cut short).
pub fn parse_required_output(text: &str, format: ToolCallFormat) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(text).ok()?;
    v.as_array()?
        .iter()
        .map(|c| {
            let name = c.get("name")?.as_str()?.to_string();
            let args = c.get("parameters").or_else(|| c.get("arguments"))?;
            Some(ToolCall {
                id: format.new_call_id(),
                name,
                arguments: args.to_string(),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The incremental parser

/// Where the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before any output (Llama-3 and bare Mistral arrays are recognised only here).
    Start,
    /// In text, looking for the start marker.
    Text,
    /// After Mistral's `[TOOL_CALLS]`: expecting the `[` of the array.
    BeforeArray,
    /// Expecting the `{` of a call object.
    BeforeObject,
    /// Inside a call object that starts at `obj_start`.
    InObject,
    /// After a call object: expecting its closing (`</tool_call>`, `,`/`]`, `;`).
    AfterObject,
    /// The calls are over; the rest is text.
    Done,
}

/// How the calls of the current run are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `<tool_call>{...}</tool_call>`.
    Tagged,
    /// `[{...}, {...}]`.
    Array,
    /// `{...}; {...}`.
    Semicolons,
}

/// Reads generated text piece by piece and emits content and tool-call events.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    /// Everything received.
    buf: String,
    /// How far `buf` has been consumed.
    pos: usize,
    mode: Mode,
    layout: Layout,
    /// Where the current call object starts in `buf`.
    obj_start: usize,
    /// Where the text of the current call starts (its marker or separator).
    raw_start: usize,
    /// Calls started so far.
    calls: usize,
    /// Whether the current call's start event was sent.
    started: bool,
    /// Bytes of the current call's arguments value already sent.
    args_sent: usize,
    /// Whether every call seen was closed properly.
    complete: bool,
    /// Constrained output: the first array starts at once, without a marker.
    bare_array: bool,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolCallParser {
    /// A parser for free text in `format` (`tool_choice: "auto"`).
    pub fn new(format: ToolCallFormat) -> Self {
        ToolCallParser {
            format,
            buf: String::new(),
            pos: 0,
            mode: Mode::Start,
            layout: Layout::Tagged,
            obj_start: 0,
            raw_start: 0,
            calls: 0,
            started: false,
            args_sent: 0,
            complete: true,
            bare_array: false,
        }
    }

    /// A parser for output constrained by [`required_schema`] (a JSON array of
    /// `{"name", "parameters"}`); ids are made in `format`'s style.
    pub fn required(format: ToolCallFormat) -> Self {
        ToolCallParser {
            bare_array: true,
            ..ToolCallParser::new(format)
        }
    }

    /// Whether every call seen so far was closed properly.
    pub fn all_complete(&self) -> bool {
        self.complete
            && !matches!(
                self.mode,
                Mode::InObject | Mode::BeforeObject | Mode::BeforeArray
            )
    }

    /// Feed more text; returns the events it completes.
    pub fn push(&mut self, text: &str) -> Vec<ToolStreamEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.run(&mut out, false);
        out
    }

    /// The text is over: emit what was held back.
    pub fn finish(&mut self) -> Vec<ToolStreamEvent> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        match self.mode {
            Mode::InObject | Mode::BeforeObject | Mode::BeforeArray => {
                self.complete = false;
                if !self.started {
                    // Nothing of this call was sent: the text is content after all.
                    let rest = self.buf[self.raw_start.min(self.pos)..].to_string();
                    if !rest.is_empty() {
                        out.push(ToolStreamEvent::Content(rest));
                    }
                }
            }
            _ => {
                if self.pos < self.buf.len() {
                    out.push(ToolStreamEvent::Content(self.buf[self.pos..].to_string()));
                }
            }
        }
        self.pos = self.buf.len();
        self.mode = Mode::Done;
        merge_content(out)
    }

    fn emit_text(&mut self, out: &mut Vec<ToolStreamEvent>, end: usize) {
        if end > self.pos {
            let text = &self.buf[self.pos..end];
            // Whitespace between calls is layout, not content.
            if self.calls == 0 || !text.trim().is_empty() {
                out.push(ToolStreamEvent::Content(text.to_string()));
            }
            self.pos = end;
        }
    }

    /// Expect a call object next; its text starts at `raw_start`.
    fn expect_object(&mut self, raw_start: usize) {
        self.raw_start = raw_start;
        self.mode = Mode::BeforeObject;
    }

    /// Advance as far as the text allows; `last` when no more text will come.
    fn run(&mut self, out: &mut Vec<ToolStreamEvent>, last: bool) {
        loop {
            let before = (self.mode, self.pos, out.len());
            match self.mode {
                Mode::Start => self.at_start(last),
                Mode::Text => self.in_text(out, last),
                Mode::BeforeArray => self.before_array(last),
                Mode::BeforeObject => self.before_object(last),
                Mode::InObject => self.in_object(out),
                Mode::AfterObject => self.after_object(last),
                Mode::Done => {
                    let end = self.buf.len();
                    self.emit_text(out, end);
                }
            }
            if (self.mode, self.pos, out.len()) == before {
                break;
            }
        }
    }

    /// The start of the output: Llama-3 calls and bare Mistral / constrained arrays begin
    /// here.
    fn at_start(&mut self, last: bool) {
        let rest = &self.buf[self.pos..];
        let trimmed = rest.trim_start();
        let ws = rest.len() - trimmed.len();
        let here = self.pos;
        if self.bare_array {
            if trimmed.starts_with('[') {
                self.pos += ws + 1;
                self.layout = Layout::Array;
                self.expect_object(here);
            } else if !trimmed.is_empty() || last {
                self.complete = false;
                self.mode = Mode::Done;
            }
            return;
        }
        if trimmed.is_empty() && !last {
            return; // only whitespace so far
        }
        match self.format {
            ToolCallFormat::Llama3Json => {
                if let Some(after) = trimmed.strip_prefix(PYTHON_TAG) {
                    self.pos = self.buf.len() - after.len();
                    self.layout = Layout::Semicolons;
                    self.expect_object(here);
                } else if trimmed.starts_with('{') {
                    self.pos += ws;
                    self.layout = Layout::Semicolons;
                    self.expect_object(here);
                } else if PYTHON_TAG.starts_with(trimmed) && !last {
                    // Could still become the tag.
                } else {
                    self.mode = Mode::Done;
                }
            }
            ToolCallFormat::Mistral => {
                // Decoding may drop the [TOOL_CALLS] special token: a leading `[{` array is
                // read as calls too.
                if !trimmed.starts_with(MISTRAL_MARK) {
                    if let Some(inner) = trimmed.strip_prefix('[') {
                        let inner = inner.trim_start();
                        if inner.starts_with('{') {
                            self.pos += ws + 1;
                            self.layout = Layout::Array;
                            self.expect_object(here);
                            return;
                        }
                        if !last && (inner.is_empty() || MISTRAL_MARK.starts_with(trimmed)) {
                            return; // not known yet
                        }
                    }
                }
                self.mode = Mode::Text;
            }
            ToolCallFormat::Hermes => self.mode = Mode::Text,
        }
    }

    /// In text: look for the format's start marker, holding back a possible partial one.
    fn in_text(&mut self, out: &mut Vec<ToolStreamEvent>, last: bool) {
        let marker = match self.format {
            ToolCallFormat::Hermes => HERMES_OPEN,
            ToolCallFormat::Mistral => MISTRAL_MARK,
            ToolCallFormat::Llama3Json => {
                self.mode = Mode::Done;
                return;
            }
        };
        let rest = &self.buf[self.pos..];
        if let Some(i) = rest.find(marker) {
            let at = self.pos + i;
            self.emit_text(out, at);
            self.pos = at + marker.len();
            self.raw_start = at;
            if self.format == ToolCallFormat::Mistral {
                self.layout = Layout::Array;
                self.mode = Mode::BeforeArray;
            } else {
                self.layout = Layout::Tagged;
                self.mode = Mode::BeforeObject;
            }
            return;
        }
        let hold = if last {
            0
        } else {
            partial_suffix(rest, marker)
        };
        let end = self.buf.len() - hold;
        self.emit_text(out, end);
    }

    /// After `[TOOL_CALLS]`: expecting `[` (after whitespace).
    fn before_array(&mut self, last: bool) {
        let rest = &self.buf[self.pos..];
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            if last {
                self.complete = false;
            }
            return;
        }
        if trimmed.starts_with('[') {
            self.pos = self.buf.len() - trimmed.len() + 1;
            self.mode = Mode::BeforeObject;
        } else {
            // Another layout (such as `name[ARGS]{...}`): not read as calls.
            self.complete = false;
            self.mode = Mode::Done;
        }
    }

    /// Expecting `{` (after whitespace).
    fn before_object(&mut self, last: bool) {
        let rest = &self.buf[self.pos..];
        let trimmed = rest.trim_start();
        let ws = rest.len() - trimmed.len();
        if trimmed.is_empty() {
            if last {
                self.complete = false;
            }
            return;
        }
        if trimmed.starts_with('{') {
            self.pos += ws;
            self.obj_start = self.pos;
            self.started = false;
            self.args_sent = 0;
            self.mode = Mode::InObject;
        } else if trimmed.starts_with(']') && self.layout == Layout::Array && self.calls > 0 {
            // A trailing comma before `]`: tolerated.
            self.pos += ws + 1;
            self.mode = Mode::Done;
        } else {
            // Not a call after all.
            self.complete = false;
            self.mode = Mode::Done;
        }
    }

    /// Inside a call object: send its name when known, then its arguments as they arrive.
    fn in_object(&mut self, out: &mut Vec<ToolStreamEvent>) {
        let text = &self.buf[self.obj_start..];
        let scan = scan_object(text);
        let name = scan.value("name");
        let args = scan.value("arguments").or_else(|| scan.value("parameters"));
        if !self.started {
            if let Some((s, Some(e))) = name {
                let Ok(Value::String(n)) = serde_json::from_str::<Value>(&text[s..e]) else {
                    self.complete = false;
                    self.mode = Mode::Done;
                    return;
                };
                out.push(ToolStreamEvent::ToolCallStart {
                    index: self.calls,
                    id: self.format.new_call_id(),
                    name: n,
                });
                self.started = true;
            }
        }
        if self.started {
            if let Some((s, end)) = args {
                let is_string = text[s..].starts_with('"');
                let fragment = match (is_string, end) {
                    // A string value is the arguments' JSON text itself: send it decoded, whole.
                    (true, Some(e)) if self.args_sent == 0 => {
                        match serde_json::from_str::<Value>(&text[s..e]) {
                            Ok(Value::String(v)) => {
                                self.args_sent = e - s;
                                Some(v)
                            }
                            _ => None,
                        }
                    }
                    (true, _) => None,
                    (false, end) => {
                        let stop = end.unwrap_or(text.len());
                        let from = s + self.args_sent;
                        (stop > from).then(|| {
                            self.args_sent = stop - s;
                            text[from..stop].to_string()
                        })
                    }
                };
                if let Some(f) = fragment.filter(|f| !f.is_empty()) {
                    out.push(ToolStreamEvent::ToolCallArguments {
                        index: self.calls,
                        fragment: f,
                    });
                }
            }
        }
        if let Some(end) = scan.end {
            if !self.started {
                // An object without a name is not a call.
                self.complete = false;
                self.mode = Mode::Done;
                return;
            }
            if args.is_none() {
                out.push(ToolStreamEvent::ToolCallArguments {
                    index: self.calls,
                    fragment: "{}".to_string(),
                });
            }
            self.pos = self.obj_start + end;
            self.calls += 1;
            self.started = false;
            self.mode = Mode::AfterObject;
        } else if scan.invalid {
            self.complete = false;
            self.mode = Mode::Done;
        }
    }

    /// After a call object: the layout's separator or closing.
    fn after_object(&mut self, last: bool) {
        let rest = &self.buf[self.pos..];
        let trimmed = rest.trim_start();
        let ws = rest.len() - trimmed.len();
        if trimmed.is_empty() {
            if last {
                // Tagged calls must be closed; the others may simply end.
                if self.layout != Layout::Semicolons {
                    self.complete = false;
                }
                self.pos = self.buf.len();
                self.mode = Mode::Done;
            }
            return;
        }
        match self.layout {
            Layout::Tagged => {
                if let Some(after) = trimmed.strip_prefix(HERMES_CLOSE) {
                    self.pos = self.buf.len() - after.len();
                    self.mode = Mode::Text;
                } else if HERMES_CLOSE.starts_with(trimmed) && !last {
                    // Wait for the rest of the closing tag.
                } else {
                    self.complete = false;
                    self.mode = Mode::Text;
                }
            }
            Layout::Array => {
                if trimmed.starts_with(',') {
                    let here = self.pos;
                    self.pos += ws + 1;
                    self.expect_object(here);
                } else if trimmed.starts_with(']') {
                    self.pos += ws + 1;
                    self.mode = Mode::Done;
                } else {
                    self.complete = false;
                    self.mode = Mode::Done;
                }
            }
            Layout::Semicolons => {
                if trimmed.starts_with(';') {
                    let here = self.pos;
                    self.pos += ws + 1;
                    self.expect_object(here);
                } else {
                    self.mode = Mode::Done;
                }
            }
        }
    }
}

/// Adjacent content events merged into one.
fn merge_content(events: Vec<ToolStreamEvent>) -> Vec<ToolStreamEvent> {
    let mut out: Vec<ToolStreamEvent> = Vec::with_capacity(events.len());
    for e in events {
        if let (Some(ToolStreamEvent::Content(prev)), ToolStreamEvent::Content(s)) =
            (out.last_mut(), &e)
        {
            prev.push_str(s);
            continue;
        }
        out.push(e);
    }
    out
}

/// The length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// What a scan of a (possibly partial) JSON object found.
#[derive(Debug, Default)]
struct ObjectScan {
    /// Top-level members: key, value start, value end (when complete).
    members: Vec<(String, usize, Option<usize>)>,
    /// Offset just past the closing `}`, when the object is complete.
    end: Option<usize>,
    /// The text cannot be a JSON object.
    invalid: bool,
}

impl ObjectScan {
    fn value(&self, key: &str) -> Option<(usize, Option<usize>)> {
        self.members
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|&(_, s, e)| (s, e))
    }
}

/// Scan the JSON object at the start of `s` (which begins with `{`), as far as it goes.
fn scan_object(s: &str) -> ObjectScan {
    let b = s.as_bytes();
    let mut scan = ObjectScan::default();
    let mut depth = 0usize;
    let mut i = 0;
    // Top-level parsing state.
    let mut key: Option<String> = None;
    let mut expect_key = false;
    let mut value_start: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' => {
                // A string: find its end.
                let start = i;
                let mut j = i + 1;
                let mut closed = false;
                while j < b.len() {
                    match b[j] {
                        b'\\' => j += 2,
                        b'"' => {
                            closed = true;
                            break;
                        }
                        _ => j += 1,
                    }
                }
                if !closed {
                    if depth == 1 && !expect_key && value_start.is_none() {
                        // A string value still being written.
                        if let Some(k) = key.take() {
                            scan.members.push((k, start, None));
                        }
                        return scan;
                    }
                    // A key, or a string inside a container value: the text ends here.
                    break;
                }
                let end = j + 1;
                if depth == 1 {
                    if expect_key {
                        key = serde_json::from_str::<String>(&s[start..end]).ok();
                        expect_key = false;
                    } else if value_start.is_none() {
                        if let Some(k) = key.take() {
                            scan.members.push((k, start, Some(end)));
                        }
                    }
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                if depth == 0 && c != b'{' {
                    scan.invalid = true;
                    return scan;
                }
                depth += 1;
                if depth == 1 {
                    expect_key = true;
                } else if depth == 2 && value_start.is_none() {
                    value_start = Some(i);
                }
            }
            b'}' | b']' => {
                if depth == 0 {
                    scan.invalid = true;
                    return scan;
                }
                depth -= 1;
                if depth == 1 {
                    if let (Some(k), Some(vs)) = (key.take(), value_start.take()) {
                        scan.members.push((k, vs, Some(i + 1)));
                    }
                } else if depth == 0 {
                    if let (Some(k), Some(vs)) = (key.take(), value_start.take()) {
                        scan.members.push((k, vs, Some(trim_end(s, vs, i))));
                    }
                    scan.end = Some(i + 1);
                    return scan;
                }
            }
            b',' if depth == 1 => {
                if let (Some(k), Some(vs)) = (key.take(), value_start.take()) {
                    scan.members.push((k, vs, Some(trim_end(s, vs, i))));
                }
                expect_key = true;
            }
            b':' if depth == 1 => {}
            c if c.is_ascii_whitespace() => {}
            _ => {
                if depth == 0 {
                    scan.invalid = true;
                    return scan;
                }
                // A number, true, false or null at the top level.
                if depth == 1 && value_start.is_none() && key.is_some() {
                    value_start = Some(i);
                }
            }
        }
        i += 1;
    }
    if depth == 1 {
        if let (Some(k), Some(vs)) = (key.take(), value_start.take()) {
            // A scalar still being written, or a container still open.
            scan.members.push((k, vs, None));
        }
    } else if depth >= 2 {
        if let (Some(k), Some(vs)) = (key.take(), value_start.take()) {
            scan.members.push((k, vs, None));
        }
    }
    scan
}

/// The end of a scalar value that runs from `start` to `end` (exclusive), without trailing
/// whitespace.
fn trim_end(s: &str, start: usize, end: usize) -> usize {
    start + s[start..end].trim_end().len()
}

#[cfg(test)]
mod tests;
