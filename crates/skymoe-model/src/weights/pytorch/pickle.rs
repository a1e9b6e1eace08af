//! A small pickle machine that rebuilds what `torch.save` writes for a state dict — and nothing
//! else. It never runs code: the only globals it knows are the few torch uses to rebuild
//! tensors (an allow-list, see [`Global`]); any other is refused by name.
//!
//! Objects live in one arena and the stack, the memo and containers hold indices into it, so
//! a memo reference costs nothing to copy, cyclic or deeply nested input cannot overflow the
//! stack, and memory grows at most linearly with the input (every object is created by an
//! opcode, and every length is checked against the bytes that remain before allocating).

use std::collections::HashMap;

use super::records::{StorageRef, TensorRecord, TorchDtype};

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// The pickle names a global outside the allow-list.
    #[error("the pickle names the global `{0}`, which is not part of a PyTorch tensor checkpoint")]
    UnsafeGlobal(String),
    /// The bytes are not a well-formed pickle of the supported opcodes.
    #[error("malformed pickle at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset of the offending opcode.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A well-formed pickle that does not hold what a checkpoint holds.
    #[error("{0}")]
    Unsupported(String),
}

/// A global the machine accepts: what torch's tensor rebuilding refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor`.
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor_v3` (dtypes without a legacy storage class).
    RebuildTensorV3,
    /// `torch._utils._rebuild_parameter`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`.
    RebuildParameterWithState,
    /// A storage class such as `torch.FloatStorage` (`torch.UntypedStorage` holds bytes).
    StorageType(TorchDtype),
    /// A dtype such as `torch.float32`.
    Dtype(TorchDtype),
}

impl Global {
    /// Resolve `module.name` against the allow-list.
    pub fn resolve(module: &str, name: &str) -> Result<Global, PickleError> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_tensor_v3") => Some(Global::RebuildTensorV3),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("torch._utils", "_rebuild_parameter_with_state") => {
                Some(Global::RebuildParameterWithState)
            }
            ("torch" | "torch.storage", "UntypedStorage") => {
                Some(Global::StorageType(TorchDtype::U8))
            }
            ("torch", n) => TorchDtype::from_storage_class(n)
                .map(Global::StorageType)
                .or_else(|| TorchDtype::from_torch_name(n).map(Global::Dtype)),
            _ => None,
        };
        g.ok_or_else(|| PickleError::UnsafeGlobal(format!("{module}.{name}")))
    }
}

/// Index of an object in [`Pickle::objects`].
pub type ObjId = usize;

/// One object built by the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// An integer too large for 64 bits (kept only as a marker).
    BigInt,
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A bytes object.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<ObjId>),
    /// A list.
    List(Vec<ObjId>),
    /// A dict (or `OrderedDict`), items in insertion order; a repeated key is listed again.
    Dict(Vec<(ObjId, ObjId)>),
    /// An allowed global.
    Global(Global),
    /// A storage named by a persistent id.
    Storage(StorageRef),
    /// A tensor rebuilt from a storage.
    Tensor(TensorRecord),
}

/// The result of running a pickle: every object built, and the one `STOP` returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Pickle {
    /// The arena of objects.
    pub objects: Vec<Obj>,
    /// The object the pickle returns.
    pub root: ObjId,
}

impl Pickle {
    /// The object with this id (ids handed out by the machine are always valid).
    pub fn get(&self, id: ObjId) -> &Obj {
        self.objects.get(id).unwrap_or(&Obj::None)
    }

    /// The root object.
    pub fn root(&self) -> &Obj {
        self.get(self.root)
    }

    /// A string object's text, accepting bytes that are ASCII (as protocol 2 may write keys).
    pub fn text(&self, id: ObjId) -> Option<&str> {
        match self.get(id) {
            Obj::Str(s) => Some(s),
            Obj::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// A short description of an object's kind, for messages.
    pub fn kind(&self, id: ObjId) -> &'static str {
        match self.get(id) {
            Obj::None => "None",
            Obj::Bool(_) => "a bool",
            Obj::Int(_) | Obj::BigInt => "an int",
            Obj::Float(_) => "a float",
            Obj::Str(_) => "a string",
            Obj::Bytes(_) => "bytes",
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Global(_) => "a class or function",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
        }
    }
}

/// Run a pickle (protocols 2 to 5, the opcodes `torch.save` emits) without executing anything.
pub fn parse_pickle(data: &[u8]) -> Result<Pickle, PickleError> {
    Machine::new(data).run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for messages).
    op_at: usize,
    objects: Vec<Obj>,
    stack: Vec<ObjId>,
    marks: Vec<usize>,
    memo: HashMap<u32, ObjId>,
}

/// Largest number of dimensions a tensor may have.
const MAX_DIMS: usize = 64;
/// Longest storage key (torch writes decimal numbers); every tensor record copies its key.
const MAX_KEY_BYTES: usize = 256;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            op_at: 0,
            objects: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn err(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.op_at,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                self.err(format!(
                    "needs {n} bytes but only {} remain",
                    self.data.len() - self.pos.min(self.data.len())
                ))
            })?;
        let s = self.data.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N)?;
        <[u8; N]>::try_from(s).map_err(|_| self.err("short read"))
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.err("length does not fit in memory"))
    }

    /// A line ending in `\n` (GLOBAL's arguments), without the newline.
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated line"))?;
        let s = self.take(n + 1)?;
        std::str::from_utf8(s.get(..n).unwrap_or_default())
            .map_err(|_| self.err("line is not UTF-8"))
    }

    fn new_obj(&mut self, o: Obj) -> ObjId {
        self.objects.push(o);
        self.objects.len() - 1
    }

    fn push(&mut self, o: Obj) {
        let id = self.new_obj(o);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<ObjId, PickleError> {
        self.top()?;
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    /// The top of the stack above the innermost MARK.
    fn top(&self) -> Result<ObjId, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<ObjId>, PickleError> {
        let m = self.marks.pop().ok_or_else(|| self.err("no MARK"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK past the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn obj_mut(&mut self, id: ObjId) -> Result<&mut Obj, PickleError> {
        let e = self.err("dangling object");
        self.objects.get_mut(id).ok_or(e)
    }

    fn obj(&self, id: ObjId) -> &Obj {
        self.objects.get(id).unwrap_or(&Obj::None)
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    fn string(&mut self, n: usize) -> Result<(), PickleError> {
        let s = self.take(n)?;
        let s = std::str::from_utf8(s).map_err(|_| self.err("string is not UTF-8"))?;
        self.push(Obj::Str(s.to_string()));
        Ok(())
    }

    fn bytes(&mut self, n: usize) -> Result<(), PickleError> {
        let b = self.take(n)?.to_vec();
        self.push(Obj::Bytes(b));
        Ok(())
    }

    fn long(&mut self, n: usize) -> Result<(), PickleError> {
        let b = self.take(n)?;
        if n > 8 {
            self.push(Obj::BigInt);
            return Ok(());
        }
        let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut a = if negative { [0xffu8; 8] } else { [0u8; 8] };
        a.get_mut(..n).unwrap_or_default().copy_from_slice(b);
        self.push(Obj::Int(i64::from_le_bytes(a)));
        Ok(())
    }

    fn set_items(&mut self, dict: ObjId, items: Vec<ObjId>) -> Result<(), PickleError> {
        let chunks = items.chunks_exact(2);
        if !chunks.remainder().is_empty() {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let pairs: Vec<(ObjId, ObjId)> = chunks
            .filter_map(|c| match c {
                [k, v] => Some((*k, *v)),
                _ => None,
            })
            .collect();
        let e = self.err("SETITEM(S) on an object that is not a dict");
        match self.obj_mut(dict)? {
            Obj::Dict(d) => {
                d.extend(pairs);
                Ok(())
            }
            _ => Err(e),
        }
    }

    fn append(&mut self, list: ObjId, items: Vec<ObjId>) -> Result<(), PickleError> {
        let e = self.err("APPEND(S) on an object that is not a list");
        match self.obj_mut(list)? {
            Obj::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(e),
        }
    }

    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is not supported")));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle {
                        objects: self.objects,
                        root,
                    });
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Obj::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Obj::Int(v.into()));
                }
                0x8a => {
                    let n = self.u8()?.into();
                    self.long(n)?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative LONG4 length"))?;
                    self.long(n)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Obj::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.string(n)?;
                }
                0x8c => {
                    let n = self.u8()?.into();
                    self.string(n)?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    self.string(n)?;
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.bytes(n)?;
                }
                b'C' | b'U' => {
                    let n = self.u8()?.into();
                    self.bytes(n)?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative string length"))?;
                    self.bytes(n)?;
                }
                0x8e => {
                    let n = self.len_u64()?;
                    self.bytes(n)?;
                }
                b'}' => self.push(Obj::Dict(Vec::new())),
                b']' => self.push(Obj::List(Vec::new())),
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n + self.marks.last().copied().unwrap_or(0) {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let id = self.new_obj(Obj::Dict(Vec::new()));
                    self.set_items(id, items)?;
                    self.stack.push(id);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.append(l, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.append(l, items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = Global::resolve(module, name)?;
                    self.push(Obj::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(m), Obj::Str(n)) = (self.obj(module), self.obj(name)) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let g = Global::resolve(m, n)?;
                    self.push(Obj::Global(g));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let o = self.reduce(func, args)?;
                    self.push(o);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.build(target, state)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.push(Obj::Storage(s));
                }
                b'q' => {
                    let k = self.u8()?.into();
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| self.err("memo is full"))?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?.into();
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                other => {
                    return Err(self.err(format!(
                        "opcode 0x{other:02x} is not one torch.save writes for a state dict"
                    )))
                }
            }
        }
    }

    fn tuple_items(&self, id: ObjId, what: &str) -> Result<&[ObjId], PickleError> {
        match self.obj(id) {
            Obj::Tuple(t) => Ok(t),
            _ => Err(self.err(format!("{what} expects a tuple of arguments"))),
        }
    }

    fn int(&self, id: ObjId, what: &str) -> Result<usize, PickleError> {
        match self.obj(id) {
            Obj::Int(v) => {
                usize::try_from(*v).map_err(|_| self.err(format!("{what} is negative: {v}")))
            }
            Obj::Bool(b) => Ok(usize::from(*b)),
            _ => Err(self.err(format!("{what} is not an integer"))),
        }
    }

    fn dims(&self, id: ObjId, what: &str) -> Result<Vec<usize>, PickleError> {
        let items = match self.obj(id) {
            Obj::Tuple(t) | Obj::List(t) => t,
            _ => return Err(self.err(format!("tensor {what} is not a tuple"))),
        };
        if items.len() > MAX_DIMS {
            return Err(self.err(format!("tensor has {} dimensions", items.len())));
        }
        items.iter().map(|&i| self.int(i, what)).collect()
    }

    fn storage(&self, id: ObjId) -> Result<StorageRef, PickleError> {
        match self.obj(id) {
            Obj::Storage(s) => Ok(s.clone()),
            _ => Err(self.err("tensor is not rebuilt from a storage")),
        }
    }

    fn tensor(
        &self,
        args: &[ObjId],
        dtype: Option<TorchDtype>,
    ) -> Result<TensorRecord, PickleError> {
        let Some(&[s, offset, size, stride]) = args.get(..4) else {
            return Err(self.err("too few arguments to rebuild a tensor"));
        };
        let storage = self.storage(s)?;
        let shape = self.dims(size, "size")?;
        let strides = self.dims(stride, "stride")?;
        if shape.len() != strides.len() {
            return Err(self.err(format!(
                "tensor size has {} dimensions but its stride {}",
                shape.len(),
                strides.len()
            )));
        }
        Ok(TensorRecord {
            dtype: dtype.unwrap_or(storage.dtype),
            storage,
            offset: self.int(offset, "storage offset")?,
            shape,
            strides,
        })
    }

    fn reduce(&self, func: ObjId, args: ObjId) -> Result<Obj, PickleError> {
        let Obj::Global(g) = self.obj(func) else {
            return Err(self.err(format!("REDUCE calls {}", kind_of(self.obj(func)))));
        };
        let a = self.tuple_items(args, "REDUCE")?;
        match g {
            Global::OrderedDict => self.ordered_dict(a),
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                let max = if *g == Global::RebuildTensor { 4 } else { 7 };
                if a.len() < 4 || a.len() > max {
                    return Err(self.err(format!("{} arguments to rebuild a tensor", a.len())));
                }
                Ok(Obj::Tensor(self.tensor(a, None)?))
            }
            Global::RebuildTensorV3 => {
                if a.len() < 7 || a.len() > 8 {
                    return Err(self.err(format!("{} arguments to rebuild a tensor", a.len())));
                }
                let dtype = match a.get(6).map(|&d| self.obj(d)) {
                    Some(Obj::Global(Global::Dtype(d))) => *d,
                    _ => return Err(self.err("_rebuild_tensor_v3 without a dtype")),
                };
                Ok(Obj::Tensor(self.tensor(a, Some(dtype))?))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                match a.first().map(|&t| self.obj(t)) {
                    Some(Obj::Tensor(t)) => Ok(Obj::Tensor(t.clone())),
                    _ => Err(self.err("a parameter is rebuilt from something not a tensor")),
                }
            }
            Global::StorageType(_) | Global::Dtype(_) => {
                Err(self.err("REDUCE calls a storage class or dtype"))
            }
        }
    }

    /// `OrderedDict()`: pickle fills it with SETITEMS afterwards. (Items passed as an
    /// argument would have to be copied, which a pickle could repeat to exhaust memory.)
    fn ordered_dict(&self, args: &[ObjId]) -> Result<Obj, PickleError> {
        if args.is_empty() {
            Ok(Obj::Dict(Vec::new()))
        } else {
            Err(self.err("OrderedDict called with arguments"))
        }
    }

    /// BUILD sets an object's state: dicts keep attributes such as `_metadata` there and
    /// parameters their Python attributes; neither matters for the tensors.
    fn build(&self, target: ObjId, state: ObjId) -> Result<(), PickleError> {
        match (self.obj(target), self.obj(state)) {
            (Obj::Dict(_) | Obj::Tensor(_), Obj::Dict(_) | Obj::None | Obj::Tuple(_)) => Ok(()),
            (t, _) => Err(self.err(format!("BUILD on {}", kind_of(t)))),
        }
    }

    /// `('storage', storage_class, key, location, numel)`.
    fn persistent_load(&self, pid: ObjId) -> Result<StorageRef, PickleError> {
        let items = self.tuple_items(pid, "a persistent id")?;
        let [tag, class, key, _location, numel] = items else {
            return Err(self.err("persistent id is not a 5-tuple"));
        };
        let text = |id: ObjId| match self.obj(id) {
            Obj::Str(s) => Some(s.as_str()),
            Obj::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        if text(*tag) != Some("storage") {
            return Err(self.err("persistent id is not a storage"));
        }
        let Obj::Global(Global::StorageType(dtype)) = self.obj(*class) else {
            return Err(self.err("persistent id names no storage class"));
        };
        let key = text(*key).ok_or_else(|| self.err("storage key is not a string"))?;
        if key.len() > MAX_KEY_BYTES {
            return Err(self.err(format!("storage key of {} bytes", key.len())));
        }
        Ok(StorageRef {
            key: key.to_string(),
            dtype: *dtype,
            numel: self.int(*numel, "storage size")?,
        })
    }
}

fn kind_of(o: &Obj) -> &'static str {
    match o {
        Obj::Global(_) => "a class or function",
        Obj::Dict(_) => "a dict",
        Obj::List(_) => "a list",
        Obj::Tuple(_) => "a tuple",
        Obj::Tensor(_) => "a tensor",
        Obj::Storage(_) => "a storage",
        _ => "a value",
    }
}
