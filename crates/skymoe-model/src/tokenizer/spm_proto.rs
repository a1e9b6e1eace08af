//! A reader for SentencePiece `tokenizer.model` files (the `ModelProto` protobuf message).
//!
//! Only the fields a tokenizer needs are decoded; every other field is skipped. The reader is
//! written for untrusted input: every length is checked against the bytes that remain, nesting
//! is fixed (at most two levels of messages are ever entered), and all allocations are bounded
//! by the size of the input.

use crate::error::{ModelError, Result};

/// How a piece behaves (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece (1).
    Normal,
    /// The unknown piece (2).
    Unknown,
    /// A control symbol such as `<s>` (3): never produced from text.
    Control,
    /// A user-defined symbol (4): always segmented as one piece.
    UserDefined,
    /// A piece kept in the vocabulary but never produced (5).
    Unused,
    /// A byte-fallback piece `<0xXX>` (6).
    Byte,
}

impl PieceType {
    /// The type for a protobuf / GGUF enum value, if it is one.
    pub fn from_i64(v: i64) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece's text (`▁` stands for a space).
    pub piece: String,
    /// Its score: a log probability (Unigram) or the negated merge rank (BPE).
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// The segmentation algorithm (`TrainerSpec.model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// Unigram language model (1).
    Unigram,
    /// Byte-pair encoding over piece scores (2).
    Bpe,
    /// Whitespace-delimited words (3).
    Word,
    /// Single characters (4).
    Char,
}

/// The fields of `TrainerSpec` a tokenizer needs, with SentencePiece's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    /// The algorithm.
    pub model_type: ModelType,
    /// Whether unknown characters are written as UTF-8 byte pieces.
    pub byte_fallback: bool,
    /// Whether `▁` ends words instead of starting them.
    pub treat_whitespace_as_suffix: bool,
    /// Id of the unknown piece (negative: none).
    pub unk_id: i32,
    /// Id of the beginning-of-sentence piece (negative: none).
    pub bos_id: i32,
    /// Id of the end-of-sentence piece (negative: none).
    pub eos_id: i32,
    /// Id of the padding piece (negative: none).
    pub pad_id: i32,
    /// Text of the unknown piece.
    pub unk_piece: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: ModelType::Unigram,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
        }
    }
}

/// The fields of `NormalizerSpec`, with SentencePiece's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    /// Name of the normalisation rule (`nmt_nfkc`, `identity`, ...).
    pub name: String,
    /// The compiled character map (empty: identity).
    pub precompiled_charsmap: Vec<u8>,
    /// Whether a `▁` is put in front of the text.
    pub add_dummy_prefix: bool,
    /// Whether leading, trailing and repeated spaces are removed.
    pub remove_extra_whitespaces: bool,
    /// Whether spaces are written as `▁`.
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A decoded `ModelProto`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelProto {
    /// The vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// Training options that matter for encoding.
    pub trainer_spec: TrainerSpec,
    /// Normalisation options.
    pub normalizer_spec: NormalizerSpec,
}

fn bad(reason: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("invalid SentencePiece model: {reason}"))
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A field's payload.
enum Payload<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A cursor over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or_else(|| bad("truncated varint"))?;
            self.buf = rest;
            if i == 9 && b > 1 {
                return Err(bad("varint overflows 64 bits"));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .ok_or_else(|| {
                bad(format!(
                    "length {n} exceeds the {} bytes left",
                    self.buf.len()
                ))
            })?;
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field, or `None` at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Payload<'a>)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(bad("field number 0"));
        }
        let payload = match (key & 7) as u8 {
            VARINT => Payload::Varint(self.varint()?),
            FIXED64 => {
                self.take(8)?;
                Payload::Fixed64
            }
            LEN => {
                let n = self.varint()?;
                Payload::Bytes(self.take(n)?)
            }
            FIXED32 => {
                let b = self.take(4)?;
                Payload::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(bad(format!("unsupported wire type {w} in field {number}"))),
        };
        Ok(Some((number, payload)))
    }
}

fn message(buf: &[u8]) -> Reader<'_> {
    Reader { buf }
}

fn as_string(p: Payload<'_>, what: &str) -> Result<String> {
    match p {
        Payload::Bytes(b) => std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| bad(format!("{what} is not valid UTF-8"))),
        _ => Err(bad(format!("{what} has the wrong wire type"))),
    }
}

fn as_varint(p: Payload<'_>, what: &str) -> Result<u64> {
    match p {
        Payload::Varint(v) => Ok(v),
        _ => Err(bad(format!("{what} has the wrong wire type"))),
    }
}

fn as_bool(p: Payload<'_>, what: &str) -> Result<bool> {
    as_varint(p, what).map(|v| v != 0)
}

/// An `int32` field: negative values are sign-extended to 64 bits on the wire.
fn as_i32(p: Payload<'_>, what: &str) -> Result<i32> {
    let v = as_varint(p, what)? as i64;
    i32::try_from(v).map_err(|_| bad(format!("{what} ({v}) is out of the int32 range")))
}

fn parse_piece(buf: &[u8]) -> Result<Piece> {
    let mut r = message(buf);
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((n, p)) = r.field()? {
        match n {
            1 => piece.piece = as_string(p, "piece")?,
            2 => match p {
                Payload::Fixed32(bits) => piece.score = f32::from_bits(bits),
                _ => return Err(bad("piece score has the wrong wire type")),
            },
            3 => {
                let v = as_varint(p, "piece type")? as i64;
                piece.kind =
                    PieceType::from_i64(v).ok_or_else(|| bad(format!("unknown piece type {v}")))?;
            }
            _ => {}
        }
    }
    if !piece.score.is_finite() {
        return Err(bad(format!(
            "piece {:?} has a non-finite score",
            piece.piece
        )));
    }
    Ok(piece)
}

fn parse_trainer_spec(buf: &[u8], spec: &mut TrainerSpec) -> Result<()> {
    let mut r = message(buf);
    while let Some((n, p)) = r.field()? {
        match n {
            3 => {
                let v = as_varint(p, "model_type")?;
                spec.model_type = match v {
                    1 => ModelType::Unigram,
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    _ => return Err(bad(format!("unknown model_type {v}"))),
                };
            }
            24 => spec.treat_whitespace_as_suffix = as_bool(p, "treat_whitespace_as_suffix")?,
            35 => spec.byte_fallback = as_bool(p, "byte_fallback")?,
            40 => spec.unk_id = as_i32(p, "unk_id")?,
            41 => spec.bos_id = as_i32(p, "bos_id")?,
            42 => spec.eos_id = as_i32(p, "eos_id")?,
            43 => spec.pad_id = as_i32(p, "pad_id")?,
            45 => spec.unk_piece = as_string(p, "unk_piece")?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer_spec(buf: &[u8], spec: &mut NormalizerSpec) -> Result<()> {
    let mut r = message(buf);
    while let Some((n, p)) = r.field()? {
        match n {
            1 => spec.name = as_string(p, "normalizer name")?,
            2 => match p {
                Payload::Bytes(b) => spec.precompiled_charsmap = b.to_vec(),
                _ => return Err(bad("precompiled_charsmap has the wrong wire type")),
            },
            3 => spec.add_dummy_prefix = as_bool(p, "add_dummy_prefix")?,
            4 => spec.remove_extra_whitespaces = as_bool(p, "remove_extra_whitespaces")?,
            5 => spec.escape_whitespaces = as_bool(p, "escape_whitespaces")?,
            _ => {}
        }
    }
    Ok(())
}

fn as_message<'a>(p: Payload<'a>, what: &str) -> Result<&'a [u8]> {
    match p {
        Payload::Bytes(b) => Ok(b),
        _ => Err(bad(format!("{what} has the wrong wire type"))),
    }
}

/// Decode a SentencePiece `ModelProto` from the bytes of a `tokenizer.model` file.
///
/// Never panics; malformed, truncated or inconsistent input gives
/// [`ModelError::Tokenizer`]. A model must have at least one piece, and the special ids of its
/// trainer spec must name pieces of the vocabulary (or be negative).
pub fn parse_model_proto(bytes: &[u8]) -> Result<ModelProto> {
    let mut model = ModelProto::default();
    let mut r = message(bytes);
    let mut seen_trainer = false;
    while let Some((n, p)) = r.field()? {
        match n {
            1 => model.pieces.push(parse_piece(as_message(p, "piece")?)?),
            2 => {
                parse_trainer_spec(as_message(p, "trainer_spec")?, &mut model.trainer_spec)?;
                seen_trainer = true;
            }
            3 => parse_normalizer_spec(
                as_message(p, "normalizer_spec")?,
                &mut model.normalizer_spec,
            )?,
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        return Err(bad("the vocabulary is empty"));
    }
    if !seen_trainer {
        return Err(bad("no trainer_spec"));
    }
    let n = model.pieces.len();
    let ts = &model.trainer_spec;
    for (name, id) in [
        ("unk_id", ts.unk_id),
        ("bos_id", ts.bos_id),
        ("eos_id", ts.eos_id),
        ("pad_id", ts.pad_id),
    ] {
        if id >= 0 && id as usize >= n {
            return Err(bad(format!("{name} {id} is outside the vocabulary of {n}")));
        }
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field_bytes(n: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn field_varint(n: u64, v: u64, out: &mut Vec<u8>) {
        varint(n << 3, out);
        varint(v, out);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        field_bytes(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(3, kind, &mut p);
        p
    }

    /// A small model, and where its last field (the normalizer spec) starts.
    fn small_model_parts() -> (Vec<u8>, usize) {
        let mut m = Vec::new();
        field_bytes(1, &piece("<unk>", 0.0, 2), &mut m);
        field_bytes(1, &piece("<s>", 0.0, 3), &mut m);
        field_bytes(1, &piece("</s>", 0.0, 3), &mut m);
        field_bytes(1, &piece("▁a", -1.5, 1), &mut m);
        let mut ts = Vec::new();
        field_varint(3, 2, &mut ts);
        field_varint(35, 1, &mut ts);
        field_varint(43, (-1i64) as u64, &mut ts);
        field_bytes(45, b"<unk>", &mut ts);
        // An unknown field of every wire type is skipped.
        field_varint(999, 7, &mut ts);
        varint(998 << 3 | 1, &mut ts);
        ts.extend_from_slice(&[0; 8]);
        field_bytes(2, &ts, &mut m);
        let start = m.len();
        let mut ns = Vec::new();
        field_bytes(1, b"identity", &mut ns);
        field_varint(4, 0, &mut ns);
        field_bytes(3, &ns, &mut m);
        (m, start)
    }

    fn small_model() -> Vec<u8> {
        small_model_parts().0
    }

    #[test]
    fn reads_pieces_and_specs() {
        let m = parse_model_proto(&small_model()).unwrap();
        assert_eq!(m.pieces.len(), 4);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].piece, "<s>");
        assert_eq!(m.pieces[3].score, -1.5);
        assert_eq!(m.trainer_spec.model_type, ModelType::Bpe);
        assert!(m.trainer_spec.byte_fallback);
        assert_eq!(m.trainer_spec.pad_id, -1);
        assert_eq!((m.trainer_spec.bos_id, m.trainer_spec.eos_id), (1, 2));
        assert_eq!(m.normalizer_spec.name, "identity");
        assert!(!m.normalizer_spec.remove_extra_whitespaces);
        assert!(m.normalizer_spec.add_dummy_prefix);
        assert!(m.normalizer_spec.precompiled_charsmap.is_empty());
    }

    #[test]
    fn truncation_inside_a_field_is_an_error() {
        let (m, last_field) = small_model_parts();
        for cut in 0..m.len() {
            // Cutting exactly before the optional normalizer spec leaves a valid model.
            if cut != last_field {
                assert!(parse_model_proto(&m[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn rejects_malformed_input() {
        // A length larger than the input.
        let mut m = Vec::new();
        varint(1 << 3 | 2, &mut m);
        varint(u64::MAX, &mut m);
        assert!(parse_model_proto(&m).is_err());
        // An overlong varint.
        assert!(parse_model_proto(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ])
        .is_err());
        // A group wire type.
        assert!(parse_model_proto(&[0x0b]).is_err());
        // A special id outside the vocabulary.
        let mut m = Vec::new();
        field_bytes(1, &piece("a", 0.0, 1), &mut m);
        let mut ts = Vec::new();
        field_varint(41, 5, &mut ts);
        field_bytes(2, &ts, &mut m);
        let e = parse_model_proto(&m).unwrap_err().to_string();
        assert!(e.contains("bos_id"), "{e}");
        // Invalid UTF-8 in a piece, an unknown piece type, a NaN score.
        for p in [
            {
                let mut p = Vec::new();
                field_bytes(1, &[0xff, 0xfe], &mut p);
                p
            },
            piece("a", 0.0, 9),
            piece("a", f32::NAN, 1),
        ] {
            let mut m = Vec::new();
            field_bytes(1, &p, &mut m);
            field_bytes(2, &[], &mut m);
            assert!(parse_model_proto(&m).is_err());
        }
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let base = small_model();
        for round in 0..2000 {
            let mut bytes = base.clone();
            for _ in 0..(1 + round % 8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state as usize) % bytes.len();
                bytes[i] = (state >> 32) as u8;
            }
            let _ = parse_model_proto(&bytes);
            let _ = parse_model_proto(&bytes[..(state as usize >> 40) % bytes.len()]);
        }
    }
}
