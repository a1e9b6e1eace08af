//! Special-token settings of a model directory: `tokenizer_config.json` (`add_bos_token`,
//! `add_eos_token`, `bos_token`, `eos_token`, `added_tokens_decoder`), `added_tokens.json`,
//! `special_tokens_map.json`, and the `eos_token_id` of `generation_config.json` / `config.json`.

use std::path::Path;

use serde_json::Value;
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};

/// The special-token files of one model directory.
pub struct SpecialConfig {
    tokenizer_config: Option<Value>,
    special_tokens_map: Option<Value>,
    eos_from_configs: Vec<u32>,
    added_tokens: Vec<(u32, AddedToken)>,
}

fn read_json(path: &Path, strict: bool) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if strict => return Err(ModelError::io(path, e)),
        Err(_) => return Ok(None),
    };
    match serde_json::from_str(&text) {
        Ok(v) => Ok(Some(v)),
        Err(e) if strict => Err(ModelError::Tokenizer(format!(
            "{} is not valid JSON: {e}",
            path.display()
        ))),
        Err(_) => Ok(None),
    }
}

/// A token given as a string or as an object with a `content` string.
fn token_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

impl SpecialConfig {
    /// Read the special-token files of `dir`; a malformed `tokenizer_config.json` or
    /// `added_tokens.json` is an error, missing files are not.
    pub fn read(dir: &Path) -> Result<Self> {
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"), true)?;
        let special_tokens_map = read_json(&dir.join("special_tokens_map.json"), false)?;
        let mut eos_from_configs = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            let v = read_json(&dir.join(name), false)?;
            match v.as_ref().and_then(|c| c.get("eos_token_id")) {
                Some(Value::Number(n)) => {
                    eos_from_configs.extend(n.as_u64().and_then(|x| u32::try_from(x).ok()))
                }
                Some(Value::Array(a)) => eos_from_configs.extend(
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .filter_map(|x| u32::try_from(x).ok()),
                ),
                _ => {}
            }
        }
        let mut added_tokens = Vec::new();
        if let Some(Value::Object(map)) = tokenizer_config
            .as_ref()
            .and_then(|c| c.get("added_tokens_decoder"))
        {
            for (id, entry) in map {
                let id: u32 = id.parse().map_err(|_| {
                    ModelError::Tokenizer(format!(
                        "added_tokens_decoder key {id:?} is not a token id"
                    ))
                })?;
                let content = token_text(entry).ok_or_else(|| {
                    ModelError::Tokenizer(format!("added token {id} has no content"))
                })?;
                let flag = |k: &str| entry.get(k).and_then(Value::as_bool);
                let special = flag("special").unwrap_or(false);
                let token = AddedToken::from(content.to_string(), special)
                    .normalized(flag("normalized").unwrap_or(!special))
                    .lstrip(flag("lstrip").unwrap_or(false))
                    .rstrip(flag("rstrip").unwrap_or(false))
                    .single_word(flag("single_word").unwrap_or(false));
                added_tokens.push((id, token));
            }
        }
        let added_path = dir.join("added_tokens.json");
        if let Some(v) = read_json(&added_path, true)? {
            let map = v.as_object().ok_or_else(|| {
                ModelError::Tokenizer(format!("{} is not an object", added_path.display()))
            })?;
            for (content, id) in map {
                let id = id
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        ModelError::Tokenizer(format!(
                            "{}: the id of {content:?} is not a token id",
                            added_path.display()
                        ))
                    })?;
                if !added_tokens.iter().any(|(i, _)| *i == id) {
                    added_tokens.push((id, AddedToken::from(content.clone(), false)));
                }
            }
        }
        added_tokens.sort_by_key(|(id, _)| *id);
        Ok(SpecialConfig {
            tokenizer_config,
            special_tokens_map,
            eos_from_configs,
            added_tokens,
        })
    }

    /// A boolean entry of `tokenizer_config.json`.
    pub fn flag(&self, key: &str) -> Option<bool> {
        self.tokenizer_config.as_ref()?.get(key)?.as_bool()
    }

    /// The text of a special token (`bos_token`, ...) from `tokenizer_config.json`, else
    /// `special_tokens_map.json`.
    pub fn token(&self, key: &str) -> Option<&str> {
        [&self.tokenizer_config, &self.special_tokens_map]
            .into_iter()
            .find_map(|c| token_text(c.as_ref()?.get(key)?))
    }

    /// `eos_token_id` of `generation_config.json` and `config.json`.
    pub fn eos_from_configs(&self) -> &[u32] {
        &self.eos_from_configs
    }

    /// Add the tokens of `added_tokens_decoder` / `added_tokens.json` whose ids lie beyond the
    /// base vocabulary, checking that each lands on its declared id.
    pub fn add_tokens_beyond(&self, tok: &mut tokenizers::Tokenizer) -> Result<()> {
        let base = tok.get_vocab_size(false) as u32;
        for (id, token) in &self.added_tokens {
            if *id < base {
                continue;
            }
            if tok.token_to_id(&token.content).is_some() {
                // Already known (tokenizer.json lists its added tokens itself).
                continue;
            }
            let next = tok.get_vocab_size(true) as u32;
            if *id != next {
                return Err(ModelError::Tokenizer(format!(
                    "added token {:?} has id {id} but the next free id is {next}",
                    token.content
                )));
            }
            if token.special {
                tok.add_special_tokens([token.clone()])
            } else {
                tok.add_tokens([token.clone()])
            }
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        }
        Ok(())
    }
}
