//! Hugging Face chat templates, rendered with `minijinja` as `transformers` renders them with
//! Jinja2 (`apply_chat_template(..., tokenize=False)`).
//!
//! The environment mirrors the one `transformers` builds: `trim_blocks` and `lstrip_blocks`
//! on, loop controls (`{% break %}`, `{% continue %}`), Python string / dict / list methods
//! (`.strip()`, `.startswith()`, `.items()`, ...) through `minijinja-contrib`'s `pycompat`, a
//! `tojson` filter that writes what Python's `json.dumps` writes (`ensure_ascii`, `indent`,
//! `separators` and `sort_keys` keyword arguments), and the globals `raise_exception(msg)` and
//! `strftime_now(fmt)`. The template sees `messages`, `add_generation_prompt`, `bos_token` and
//! `eos_token` (undefined when the model has none, as in `transformers`), and `tools` and
//! `documents` (none unless given: [`ChatTemplate::render_json`] passes OpenAI-style
//! messages — with `tool_calls`, `tool_call_id`, `name` — and a request's `tools` through as
//! they are).
//!
//! Not supported: the `{% generation %}` tag of `transformers`' assistant-mask extension.
//! `strftime_now` uses UTC (the `transformers` version uses the local time zone, which is UTC
//! on most servers).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// The template's name inside its environment (appears in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// The ChatML format: `<|im_start|>role\ncontent<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` as the generation prompt.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user`, `assistant`, ... (templates decide which they accept).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file of the model directory is not valid JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The tokenizer configuration has an unexpected shape.
    #[error("invalid tokenizer configuration {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `chat_template` is a list of named templates and none is called `default`.
    #[error("the model has several chat templates ({names}) and none named \"default\"")]
    NoDefault {
        /// The names found, comma-separated.
        names: String,
    },
    /// The template does not compile.
    #[error("the chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`: the conversation is not one the
    /// template accepts.
    #[error("the chat template rejected the conversation: {0}")]
    Raised(String),
    /// Rendering failed for another reason (an undefined attribute, a type error, ...).
    #[error("cannot render the chat template: {0}")]
    Render(String),
}

/// The error a template's `raise_exception(message)` call carries, recognised by
/// [`ChatTemplate::render`].
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile the Jinja `source`; `bos_token` and `eos_token` are what the template sees
    /// under those names (undefined when `None`). A template that does not compile is a
    /// [`ChatTemplateError::Syntax`].
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The built-in ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`, generation
    /// prompt `<|im_start|>assistant\n`), for models that ship no template.
    pub fn chatml() -> Self {
        // The source is a constant that compiles (checked by the tests); should that ever
        // change, fall back to an environment without the template rather than panic:
        // rendering then reports the missing template as an error.
        match ChatTemplate::new(CHATML, None, None) {
            Ok(t) => t,
            Err(_) => ChatTemplate {
                env: Environment::new(),
                source: CHATML.to_string(),
                bos_token: None,
                eos_token: None,
            },
        }
    }

    /// The chat template of a Hugging Face model directory, or `None` if it has none.
    ///
    /// As in `transformers`, a `chat_template.jinja` file takes priority over the
    /// `chat_template` entry of `tokenizer_config.json`, which may be a string or a list of
    /// `{name, template}` (the one named `default` is used). `bos_token` and `eos_token` come
    /// from `tokenizer_config.json` (or else `special_tokens_map.json`), as strings or as
    /// objects with a `content` string.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let special_path = dir.join("special_tokens_map.json");
        let special = read_json(&special_path)?;

        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| ChatTemplateError::Io {
                    path: jinja_path.clone(),
                    source,
                })?,
            )
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => None,
                Some(t) => Some(template_from_config(t, &config_path)?),
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };

        let token = |name: &str| -> Result<Option<String>, ChatTemplateError> {
            if let Some(v) = config.as_ref().and_then(|c| c.get(name)) {
                if !v.is_null() {
                    return special_token(v, name, &config_path).map(Some);
                }
            }
            match special.as_ref().and_then(|c| c.get(name)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => special_token(v, name, &special_path).map(Some),
            }
        };
        let bos = token("bos_token")?;
        let eos = token("eos_token")?;
        ChatTemplate::new(source, bos, eos).map(Some)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The beginning-of-sequence token the template sees, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token the template sees, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Render `messages` as the model's prompt text; with `add_generation_prompt`, end with
    /// the text that opens the assistant's reply. A `raise_exception` call in the template is
    /// a [`ChatTemplateError::Raised`] carrying its message.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_values(
            Value::from_serialize(messages),
            Value::from(()),
            add_generation_prompt,
        )
    }

    /// Render messages given as JSON objects (any fields: `role`, `content`, `tool_calls`,
    /// `tool_call_id`, `name`, ...) with the function `tools` (`None`: the template sees
    /// none), as `apply_chat_template(messages, tools=tools)` does. Objects keep their key
    /// order, so `tojson` writes tools as the client sent them.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_json_with(
            messages,
            tools,
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// [`ChatTemplate::render_json`] with further template variables `kwargs` (vLLM's
    /// `chat_template_kwargs`, `apply_chat_template(..., **kwargs)`: e.g. `enable_thinking`).
    /// Names the renderer sets itself (`messages`, `tools`, `documents`,
    /// `add_generation_prompt`) are not overridden.
    pub fn render_json_with(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let tools = match tools {
            Some(t) => Value::from_serialize(t),
            None => Value::from(()),
        };
        self.render_values_with(
            Value::from_serialize(messages),
            tools,
            add_generation_prompt,
            kwargs,
        )
    }

    /// Render OpenAI chat messages: content parts joined, tool-call arguments as the objects
    /// they encode, as vLLM passes them
    /// ([`messages_for_template`](crate::tool_calls::messages_for_template)); a template
    /// that writes the arguments as text (and fails on an object, as DeepSeek's do) gets the
    /// client's JSON strings, as transformers gives them.
    pub fn render_openai(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let prepared = crate::tool_calls::messages_for_template(messages);
        match self.render_json_with(&prepared, tools, add_generation_prompt, kwargs) {
            Ok(text) => Ok(text),
            Err(first) => {
                let strings = crate::tool_calls::messages_with_string_arguments(messages);
                self.render_json_with(&strings, tools, add_generation_prompt, kwargs)
                    .map_err(|_| first)
            }
        }
    }

    /// Whether the template reads `tools` (templates that do not ignore a request's tools).
    pub fn uses_tools(&self) -> bool {
        self.source.contains("tools")
    }

    fn render_values(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_values_with(
            messages,
            tools,
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    fn render_values_with(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", messages),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", tools),
            ("documents", Value::from(())),
        ];
        if let Some(b) = &self.bos_token {
            ctx.push(("bos_token", Value::from(b.as_str())));
        }
        if let Some(e) = &self.eos_token {
            ctx.push(("eos_token", Value::from(e.as_str())));
        }
        const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];
        for (k, v) in kwargs {
            if !RESERVED.contains(&k.as_str()) {
                // A later entry of the same name replaces an earlier one (bos_token, ...).
                ctx.push((k.as_str(), Value::from_serialize(v)));
            }
        }
        let ctx: Value = ctx.into_iter().collect();
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => ChatTemplateError::Raised(msg),
            None => ChatTemplateError::Render(describe(&e)),
        })
    }
}

/// A minijinja error with its detail and location, on one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

/// The message of a `raise_exception` call somewhere in `e`'s chain of causes.
fn raised_message(e: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(r) = err.downcast_ref::<RaisedException>() {
            return Some(r.0.clone());
        }
        source = err.source();
    }
    None
}

/// Read a JSON file if it exists.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ChatTemplateError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ChatTemplateError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// The template source of a `chat_template` entry: a string, or a list of `{name, template}`.
fn template_from_config(v: &serde_json::Value, path: &Path) -> Result<String, ChatTemplateError> {
    let bad = |message: String| ChatTemplateError::Config {
        path: path.to_path_buf(),
        message,
    };
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(bad(
                        "chat_template list entries must be {\"name\": string, \"template\": string}"
                            .to_string(),
                    ));
                };
                if name == "default" {
                    return Ok(template.to_string());
                }
                names.push(name.to_string());
            }
            Err(ChatTemplateError::NoDefault {
                names: names.join(", "),
            })
        }
        other => Err(bad(format!(
            "chat_template must be a string or a list of named templates, not {other}"
        ))),
    }
}

/// A special token given as a string or as an object with a `content` string.
fn special_token(
    v: &serde_json::Value,
    name: &str,
    path: &Path,
) -> Result<String, ChatTemplateError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Object(o) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(ChatTemplateError::Config {
                path: path.to_path_buf(),
                message: format!("{name} is an object without a \"content\" string"),
            }),
        },
        other => Err(ChatTemplateError::Config {
            path: path.to_path_buf(),
            message: format!("{name} must be a string or an object, not {other}"),
        }),
    }
}

/// `raise_exception(message)`: fail rendering with `message`.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

/// `strftime_now(format)`: the current UTC time formatted like Python's `strftime`.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_time(secs, &format)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Format the UTC time `secs` seconds after the Unix epoch with a C/Python `strftime` format.
/// Supported: `%Y %y %m %d %e %H %I %M %S %p %j %b %h %B %a %A %w %u %F %T %D %R %%`; `%Z` and
/// `%z` give `UTC` and `+0000`; other directives are copied as they are.
fn format_time(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = WEEKDAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{yday:03}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'a' => write!(out, "{}", &day_name[..3]),
            'A' => write!(out, "{day_name}"),
            'w' => write!(out, "{weekday}"),
            'u' => write!(out, "{}", if weekday == 0 { 7 } else { weekday }),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'R' => write!(out, "{hour:02}:{minute:02}"),
            'D' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// Year, month (1–12) and day (1–31) of a day count since 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Options of the `tojson` filter, as in `json.dumps`.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, with those keyword arguments.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => return Err(invalid("tojson: indent must be an integer or a string")),
            },
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => return Err(invalid("tojson: indent must be an integer or a string")),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid("tojson: separators must be two strings"))?;
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => return Err(invalid("tojson: separators must be two strings")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn invalid(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.to_string())
}

/// Write `v` as Python's `json.dumps` would with `style`.
fn write_json(out: &mut String, v: &Value, style: &JsonStyle, depth: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => {
            write_json_string(out, v.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, style, depth, '[', ']', &items, |out, item| {
                write_json(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None | ValueKind::Undefined => "null".to_string(),
                    ValueKind::Bool | ValueKind::Number => {
                        let mut s = String::new();
                        write_json(&mut s, &key, style, depth)?;
                        s
                    }
                    _ => {
                        return Err(invalid(
                            "tojson: map keys must be strings, numbers or booleans",
                        ))
                    }
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, depth, '{', '}', &entries, |out, (key, item)| {
                write_json_string(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, item, style, depth + 1)
            })?;
        }
        _ => {
            return Err(invalid(&format!(
                "tojson: a value of type {} is not JSON serialisable",
                v.kind()
            )))
        }
    }
    Ok(())
}

/// Write a list or an object: the items separated by `style.item_sep`, each on its own
/// indented line when `style.indent` is set; empty containers are `[]` / `{}`.
fn write_container<T>(
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, depth + 1);
        write_item(out, item)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A JSON string literal as Python's `json` module writes it.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, positional for exponents in
/// [-4, 16), scientific (`1e+20`, `1.5e-07`) otherwise; `NaN`, `Infinity`, `-Infinity` as
/// `json.dumps` writes them.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else if exp + 1 >= n {
            format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% if message['role'] == 'system' and not loop.first %}{{ raise_exception('System message must be the first message') }}{% endif %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    const MISTRAL: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'].strip() + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'].strip() + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'].strip() + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"#;

    /// Relies on `trim_blocks` and `lstrip_blocks` and Python string methods.
    const BLOCKS: &str = "{% for message in messages %}
  {% if message.role.startswith('sys') %}
<<SYS>>{{ message.content.strip() }}<</SYS>>
  {% else %}
{{ message.role.upper() }}: {{ message.content }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:
{% endif %}
";

    const JSON: &str = r#"{{ messages | tojson }}
{{ {"b": 1, "a": [1.5, 2, true, none, "é\n\"<>&", 1e20, 0.0001, 123456789012.5], "c": {}} | tojson(indent=2, sort_keys=true) }}
{{ [1, [2, 3], {"k": "v"}] | tojson(separators=(",", ":")) }}
{{ "日本" | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=4) }}|{{ none | tojson }}|{{ tools | tojson }}|{% if tools is none %}no tools{% endif %}
{%- for m in messages %}{% if loop.last %}{% break %}{% endif %}[{{ m.content | length }}]{% endfor %}
{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"#;

    fn plain() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Hello!"),
            ChatMessage::new("assistant", " Hi there. "),
            ChatMessage::new("user", "What is 2+2?"),
        ]
    }

    fn with_system() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "  You are terse.\n"),
            ChatMessage::new("user", " Hi "),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye\n"),
        ]
    }

    fn tpl(source: &str) -> ChatTemplate {
        match ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn render(t: &ChatTemplate, m: &[ChatMessage], gen: bool) -> String {
        match t.render(m, gen) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    // Expected strings below were produced by transformers 5.2 (`render_jinja_template`, the
    // function behind `apply_chat_template(..., tokenize=False)`) with bos "<s>", eos "</s>".

    #[test]
    fn smollm2_template_matches_transformers() {
        let t = tpl(SMOLLM2);
        assert_eq!(
            render(&t, &plain(), false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n Hi there. <|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        );
        assert_eq!(
            render(&t, &plain(), true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n Hi there. <|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            render(&t, &with_system(), true),
            "<|im_start|>system\n  You are terse.\n<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye\n<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(render(&t, &[], false), "");
    }

    #[test]
    fn llama3_template_matches_transformers() {
        let t = tpl(LLAMA3);
        assert_eq!(
            render(&t, &plain(), false),
            "<s><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        );
        assert_eq!(
            render(&t, &with_system(), true),
            "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let t = tpl(LLAMA3);
        let mut m = plain();
        m.push(ChatMessage::new("system", "late"));
        match t.render(&m, true) {
            Err(ChatTemplateError::Raised(msg)) => {
                assert_eq!(msg, "System message must be the first message")
            }
            other => panic!("{other:?}"),
        }
        let t = tpl(MISTRAL);
        let m = vec![ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        match t.render(&m, false) {
            Err(ChatTemplateError::Raised(msg)) => assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("{other:?}"),
        }
        let m = vec![ChatMessage::new("user", "a"), ChatMessage::new("tool", "x")];
        match t.render(&m, false) {
            Err(e @ ChatTemplateError::Raised(_)) => assert_eq!(
                e.to_string(),
                "the chat template rejected the conversation: Only user and assistant roles are supported!"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mistral_template_with_strip_matches_transformers() {
        let t = tpl(MISTRAL);
        let want = "<s> [INST] Hello! [/INST] Hi there.</s> [INST] What is 2+2? [/INST]";
        assert_eq!(render(&t, &plain(), false), want);
        assert_eq!(render(&t, &plain(), true), want);
        assert_eq!(
            render(&t, &with_system(), true),
            "<s> [INST] You are terse.\n\nHi [/INST] Hello.</s> [INST] Bye [/INST]"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        let t = tpl(BLOCKS);
        assert_eq!(
            render(&t, &plain(), false),
            "USER: Hello!\nASSISTANT:  Hi there. \nUSER: What is 2+2?\n"
        );
        assert_eq!(
            render(&t, &plain(), true),
            "USER: Hello!\nASSISTANT:  Hi there. \nUSER: What is 2+2?\nASSISTANT:\n"
        );
        assert_eq!(
            render(&t, &with_system(), true),
            "<<SYS>>You are terse.<</SYS>>\nUSER:  Hi \nASSISTANT: Hello.\nUSER: Bye\n\nASSISTANT:\n"
        );
    }

    #[test]
    fn tojson_loop_controls_and_namespace_match_transformers() {
        let t = tpl(JSON);
        let tail = "\n{\n  \"a\": [\n    1.5,\n    2,\n    true,\n    null,\n    \"é\\n\\\"<>&\",\n    1e+20,\n    0.0001,\n    123456789012.5\n  ],\n  \"b\": 1,\n  \"c\": {}\n}\n[1,[2,3],{\"k\":\"v\"}]\n\"\\u65e5\\u672c\"|[]|null|null|no tools";
        assert_eq!(
            render(&t, &plain(), false),
            format!("[{{\"role\": \"user\", \"content\": \"Hello!\"}}, {{\"role\": \"assistant\", \"content\": \" Hi there. \"}}, {{\"role\": \"user\", \"content\": \"What is 2+2?\"}}]{tail}[6][11]3")
        );
        assert_eq!(
            render(&t, &with_system(), true),
            format!("[{{\"role\": \"system\", \"content\": \"  You are terse.\\n\"}}, {{\"role\": \"user\", \"content\": \" Hi \"}}, {{\"role\": \"assistant\", \"content\": \"Hello.\"}}, {{\"role\": \"user\", \"content\": \"Bye\\n\"}}]{tail}[17][4][6]4")
        );
    }

    #[test]
    fn python_float_repr_matches_python() {
        // repr() of each value in CPython.
        for (f, want) in [
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012.5, "123456789012.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-1.25e100, "-1.25e+100"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (1.0 / 3.0, "0.3333333333333333"),
            (12345.678, "12345.678"),
        ] {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn strftime_matches_python() {
        // datetime.fromtimestamp(t, timezone.utc).strftime(...) in CPython.
        assert_eq!(
            format_time(0, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %p %I %w %u %%"),
            "1970-01-01 00:00:00 Thu Thursday Jan January 001 70 AM 12 4 4 %"
        );
        assert_eq!(format_time(1_709_164_800, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            format_time(1_709_251_199, "%F %T %j %A %I%p"),
            "2024-02-29 23:59:59 060 Thursday 11PM"
        );
        assert_eq!(format_time(951_782_400, "%D %e"), "02/29/00 29");
        assert_eq!(format_time(-86_400, "%Y-%m-%d %a"), "1969-12-31 Wed");
        assert_eq!(
            format_time(4_102_444_800, "%Y-%m-%d %a %j"),
            "2100-01-01 Fri 001"
        );
        assert_eq!(format_time(0, "%Q trailing %"), "%Q trailing %");
        // Round trip over many days, including leap years.
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
        }
        // The global renders today's date without error.
        let t = tpl("{{ strftime_now('%d %b %Y') }}");
        assert_eq!(render(&t, &[], false).len(), 11);
    }

    #[test]
    fn missing_special_tokens_are_undefined() {
        let t = match ChatTemplate::new(
            "[{{ bos_token }}|{{ eos_token is defined }}|{{ none }}|{{ true }}]",
            None,
            None,
        ) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(render(&t, &[], false), "[|False|None|True]");
        assert_eq!(t.bos_token(), None);
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        let m = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            render(&t, &m, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            render(&t, &m, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        assert!(ChatTemplate::new(CHATML, None, None).is_ok());
    }

    #[test]
    fn broken_template_is_a_construction_error() {
        for src in [
            "{% for message in messages %}{{ message['content'] }}",
            "{{ messages[0]['content'] ",
            "{% if %}x{% endif %}",
            "{% frobnicate %}",
        ] {
            match ChatTemplate::new(src, None, None) {
                Err(ChatTemplateError::Syntax(msg)) => {
                    assert!(msg.contains("syntax error"), "{msg}");
                    assert!(msg.contains(TEMPLATE_NAME), "{msg}");
                }
                other => panic!("{src}: {other:?}"),
            }
        }
    }

    #[test]
    fn render_errors_are_typed() {
        let t = tpl("{{ messages[0].content.nosuchmethod() }}");
        match t.render(&plain(), false) {
            Err(ChatTemplateError::Render(msg)) => assert!(msg.contains("nosuchmethod"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let t = tpl("{{ messages[5]['role'] }}");
        assert!(matches!(
            t.render(&plain(), false),
            Err(ChatTemplateError::Render(_))
        ));
        let t = tpl("{{ messages | tojson(indent=[1]) }}");
        assert!(matches!(
            t.render(&plain(), false),
            Err(ChatTemplateError::Render(_))
        ));
        let t = tpl("{{ messages | tojson(bogus=1) }}");
        assert!(matches!(
            t.render(&plain(), false),
            Err(ChatTemplateError::Render(_))
        ));
    }

    #[test]
    fn chat_message_serde() {
        let m: ChatMessage = match serde_json::from_str(r#"{"role": "user", "content": "hi"}"#) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(m, ChatMessage::new("user", "hi"));
        assert_eq!(
            serde_json::to_string(&m).ok().as_deref(),
            Some(r#"{"role":"user","content":"hi"}"#)
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            panic!("{e}");
        }
    }

    fn load(dir: &Path) -> Option<ChatTemplate> {
        match ChatTemplate::from_model_dir(dir) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn tempdir() -> tempfile::TempDir {
        match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn model_dir_with_string_template_and_token_objects() {
        let d = tempdir();
        let cfg = serde_json::json!({
            "bos_token": {"content": "<|begin_of_text|>", "lstrip": false, "__type": "AddedToken"},
            "eos_token": "<|eot_id|>",
            "chat_template": LLAMA3,
        });
        write(d.path(), "tokenizer_config.json", &cfg.to_string());
        let t = load(d.path()).expect("a template");
        assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(t.eos_token(), Some("<|eot_id|>"));
        assert_eq!(t.source(), LLAMA3);
        assert!(render(&t, &plain(), false).starts_with("<|begin_of_text|><|start_header_id|>user"));
    }

    #[test]
    fn model_dir_with_list_of_templates() {
        let d = tempdir();
        let cfg = serde_json::json!({
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": SMOLLM2},
                {"name": "rag", "template": "RAG"},
            ],
        });
        write(d.path(), "tokenizer_config.json", &cfg.to_string());
        let t = load(d.path()).expect("a template");
        assert_eq!(t.source(), SMOLLM2);
        assert_eq!(t.bos_token(), None);

        let cfg = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "A"}, {"name": "rag", "template": "B"}],
        });
        write(d.path(), "tokenizer_config.json", &cfg.to_string());
        match ChatTemplate::from_model_dir(d.path()) {
            Err(ChatTemplateError::NoDefault { names }) => assert_eq!(names, "tool_use, rag"),
            other => panic!("{other:?}"),
        }
        let cfg = serde_json::json!({ "chat_template": [{"name": "default"}] });
        write(d.path(), "tokenizer_config.json", &cfg.to_string());
        assert!(matches!(
            ChatTemplate::from_model_dir(d.path()),
            Err(ChatTemplateError::Config { .. })
        ));
        let cfg = serde_json::json!({ "chat_template": 3 });
        write(d.path(), "tokenizer_config.json", &cfg.to_string());
        assert!(matches!(
            ChatTemplate::from_model_dir(d.path()),
            Err(ChatTemplateError::Config { .. })
        ));
    }

    #[test]
    fn model_dir_jinja_file_takes_priority() {
        let d = tempdir();
        let cfg = serde_json::json!({ "bos_token": "<s>", "chat_template": "FROM CONFIG" });
        write(d.path(), "tokenizer_config.json", &cfg.to_string());
        write(
            d.path(),
            "chat_template.jinja",
            "{{ bos_token }}FROM FILE\n",
        );
        let t = load(d.path()).expect("a template");
        assert_eq!(render(&t, &[], false), "<s>FROM FILE");
        // The file alone is enough; special tokens then come from special_tokens_map.json.
        let d = tempdir();
        write(
            d.path(),
            "chat_template.jinja",
            "{{ bos_token }}|{{ eos_token }}",
        );
        write(
            d.path(),
            "special_tokens_map.json",
            r#"{"bos_token": {"content": "<B>"}, "eos_token": "<E>"}"#,
        );
        let t = load(d.path()).expect("a template");
        assert_eq!(render(&t, &[], false), "<B>|<E>");
    }

    #[test]
    fn model_dir_without_template_or_with_bad_files() {
        let d = tempdir();
        assert!(load(d.path()).is_none());
        write(
            d.path(),
            "tokenizer_config.json",
            r#"{"bos_token": "<s>", "chat_template": null}"#,
        );
        assert!(load(d.path()).is_none());
        write(d.path(), "tokenizer_config.json", "{not json");
        assert!(matches!(
            ChatTemplate::from_model_dir(d.path()),
            Err(ChatTemplateError::Json { .. })
        ));
        write(
            d.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "{% if %}"}"#,
        );
        assert!(matches!(
            ChatTemplate::from_model_dir(d.path()),
            Err(ChatTemplateError::Syntax(_))
        ));
        write(
            d.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "x", "bos_token": {"id": 1}}"#,
        );
        assert!(matches!(
            ChatTemplate::from_model_dir(d.path()),
            Err(ChatTemplateError::Config { .. })
        ));
    }

    /// Real templates with tools, tool calls and tool results, against `transformers`'
    /// rendering (`fixtures/chat_templates/*.cases.json`).
    #[test]
    fn tool_templates_match_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat_templates");
        let read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
            Ok(s) => s,
            Err(e) => panic!("{name}: {e}"),
        };
        let doc: serde_json::Value =
            match serde_json::from_str(&read("qwen2.5-instruct.cases.json")) {
                Ok(v) => v,
                Err(e) => panic!("{e}"),
            };
        let t = tpl(&read("qwen2.5-instruct.jinja"));
        assert!(t.uses_tools());
        let openai = doc["openai_messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let prepared = crate::tool_calls::messages_for_template(&openai);
        for case in doc["cases"].as_array().cloned().unwrap_or_default() {
            let tools = case["tools"].as_array().cloned();
            let msgs = if tools.is_some() {
                prepared.clone()
            } else {
                vec![prepared[0].clone(), prepared[3].clone()]
            };
            let got = match t.render_json(
                &msgs,
                tools.as_deref(),
                case["add_generation_prompt"].as_bool().unwrap_or(false),
            ) {
                Ok(s) => s,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(
                got,
                case["expected"].as_str().unwrap_or_default(),
                "{}",
                case["name"]
            );
        }
        // The plain renderer and the JSON one agree on plain messages.
        let plain_json: Vec<serde_json::Value> = plain()
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        assert_eq!(
            t.render_json(&plain_json, None, true).ok(),
            t.render(&plain(), true).ok()
        );
        assert!(!ChatTemplate::chatml().uses_tools());
    }

    /// The templates of the MoE families (Qwen3, DeepSeek-V3.1, OLMoE, DeepSeek-V2) render
    /// OpenAI conversations as transformers does: tools, tool calls and results, reasoning kept
    /// or dropped, and template variables (`enable_thinking`, `thinking`) given as
    /// `chat_template_kwargs`; for the tool-less OLMoE and DeepSeek-V2 templates, system
    /// prompts, histories with and without the generation prompt, an assistant turn last and
    /// content whose whitespace must survive (`fixtures/chat_templates/*.render-cases.json`,
    /// tools/reference/make_chat_template_cases.py).
    #[test]
    fn family_templates_match_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat_templates");
        let read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
            Ok(s) => s,
            Err(e) => panic!("{name}: {e}"),
        };
        for file in [
            "qwen3.render-cases.json",
            "deepseek-v3.1.render-cases.json",
            "olmoe-instruct.render-cases.json",
            "deepseek-v2-chat.render-cases.json",
        ] {
            let doc: serde_json::Value = match serde_json::from_str(&read(file)) {
                Ok(v) => v,
                Err(e) => panic!("{file}: {e}"),
            };
            let token = |k: &str| doc[k].as_str().map(str::to_string);
            let t = match ChatTemplate::new(
                read(doc["template"].as_str().unwrap_or_default()),
                token("bos_token"),
                token("eos_token"),
            ) {
                Ok(t) => t,
                Err(e) => panic!("{file}: {e}"),
            };
            let cases = doc["cases"].as_array().cloned().unwrap_or_default();
            assert_eq!(cases.len(), 5, "{file}");
            for case in cases {
                let messages = case["messages"].as_array().cloned().unwrap_or_default();
                let tools = case["tools"].as_array().cloned();
                let kwargs = case["kwargs"].as_object().cloned().unwrap_or_default();
                let got = t.render_openai(
                    &messages,
                    tools.as_deref(),
                    case["add_generation_prompt"].as_bool().unwrap_or(false),
                    &kwargs,
                );
                assert_eq!(
                    got.ok().as_deref(),
                    case["expected"].as_str(),
                    "{file} {}",
                    case["name"]
                );
            }
        }
    }

    #[test]
    fn template_is_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<ChatTemplate>();
    }
}
