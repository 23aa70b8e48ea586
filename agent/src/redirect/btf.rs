//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just
//! enough to find the byte offset of a named member of a named struct.
//!
//! The kernel programs cannot use CO-RE relocations (aya-ebpf has none), so
//! the few `task_struct`/`mm_struct`/`file`/`inode`/`super_block` fields the
//! connect hooks read are located here at load time and handed to them in a
//! map. Members inside anonymous structs and unions (recent `mm_struct` keeps
//! everything in one) are found by descending into them and adding their
//! offsets.
//!
//! The format (kernel `Documentation/bpf/btf.rst`): a header, a type section
//! of variable-length records whose ids count from 1 in order, and a string
//! section of NUL-terminated names. Every read is bounds-checked; a malformed
//! blob is an error, never a panic.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
/// Anonymous members are followed at most this deep (guards against loops).
const MAX_DEPTH: usize = 16;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum BtfError {
    /// The blob is not BTF or is cut short.
    #[error("malformed BTF: {0}")]
    Malformed(String),
    /// No struct of that name.
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    /// The struct has no such member (also not in an anonymous member).
    #[error("struct {strukt} has no member {member}")]
    NoMember {
        /// The struct searched.
        strukt: String,
        /// The member asked for.
        member: String,
    },
    /// The member is a bitfield or not byte aligned.
    #[error("member {member} of struct {strukt} is not byte aligned")]
    Unaligned {
        /// The struct searched.
        strukt: String,
        /// The member asked for.
        member: String,
    },
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset from the start of the enclosing struct or union.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// For modifiers and typedefs, the type referred to.
    referred: u32,
    members: Vec<Member>,
}

/// Parsed BTF: the struct/union members and the modifier chains, nothing
/// else.
#[derive(Debug)]
pub(super) struct Btf {
    /// Index 0 is the `void` type id 0.
    types: Vec<Type>,
    strings: Vec<u8>,
    /// First struct id for each struct name.
    structs: HashMap<String, u32>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let end = self.pos.checked_add(4).ok_or_else(|| short("u32"))?;
        let raw = self.bytes.get(self.pos..end).ok_or_else(|| short("u32"))?;
        self.pos = end;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        let end = self.pos.checked_add(n).ok_or_else(|| short("record"))?;
        if end > self.bytes.len() {
            return Err(short("record"));
        }
        self.pos = end;
        Ok(())
    }
}

fn short(what: &str) -> BtfError {
    BtfError::Malformed(format!("type section ends inside a {what}"))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub(super) fn from_kernel() -> Result<Btf, String> {
        let path = "/sys/kernel/btf/vmlinux";
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Btf::parse(&bytes).map_err(|e| format!("{path}: {e}"))
    }

    /// Parses a little-endian BTF blob.
    pub(super) fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let header = |at: usize| -> Result<u32, BtfError> {
            let raw = bytes
                .get(at..at + 4)
                .ok_or_else(|| BtfError::Malformed("header cut short".into()))?;
            Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
        };
        let magic = bytes
            .get(0..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or_else(|| BtfError::Malformed("header cut short".into()))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed(format!(
                "magic {magic:#06x}, expected {MAGIC:#06x} (little-endian BTF)"
            )));
        }
        let hdr_len = header(4)? as usize;
        let (type_off, type_len) = (header(8)? as usize, header(12)? as usize);
        let (str_off, str_len) = (header(16)? as usize, header(20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some((start, start.checked_add(len)?)))
                .and_then(|(start, end)| bytes.get(start..end))
                .ok_or_else(|| BtfError::Malformed(format!("{what} section out of bounds")))
        };
        let type_section = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            referred: 0,
            members: Vec::new(),
        }];
        let mut r = Reader {
            bytes: type_section,
            pos: 0,
        };
        while r.pos < type_section.len() {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_STRUCT | KIND_UNION => {
                    members.reserve(vlen.min(4096));
                    for _ in 0..vlen {
                        let name_off = r.u32()?;
                        let type_id = r.u32()?;
                        let offset = r.u32()?;
                        members.push(Member {
                            name_off,
                            type_id,
                            // With kind_flag the top 8 bits are a bitfield
                            // size and the low 24 the bit offset.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => r.skip(4)?,
                KIND_ARRAY => r.skip(12)?,
                KIND_ENUM | KIND_FUNC_PROTO => r.skip(vlen * 8)?,
                KIND_DATASEC | KIND_ENUM64 => r.skip(vlen * 12)?,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                other => {
                    return Err(BtfError::Malformed(format!(
                        "unknown kind {other} at type id {}",
                        types.len()
                    )))
                }
            }
            types.push(Type {
                name_off,
                kind,
                referred: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        let mut structs = HashMap::new();
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.name(t.name_off).to_owned();
                let id = u32::try_from(id).unwrap_or(u32::MAX);
                structs.entry(name).or_insert(id);
            }
        }
        btf.structs = structs;
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let Some(rest) = self.strings.get(off as usize..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(rest.get(..end).unwrap_or_default()).unwrap_or("")
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..MAX_DEPTH {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.referred
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The offsets of `fields` ((struct, member) pairs), in order.
    pub(super) fn member_offsets<const N: usize>(
        &self,
        fields: &[(&str, &str); N],
    ) -> Result<[u32; N], String> {
        let mut found = [0u32; N];
        for (slot, (strukt, member)) in found.iter_mut().zip(fields) {
            *slot = self
                .member_offset(strukt, member)
                .map_err(|e| e.to_string())?;
        }
        Ok(found)
    }

    /// Byte offset of `member` in struct `strukt`, looking through anonymous
    /// struct and union members.
    pub(super) fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let t = self
            .types
            .get(id as usize)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let bits = self
            .find_bits(t, member, 0)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })?;
        if bits % 8 != 0 {
            return Err(BtfError::Unaligned {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            });
        }
        Ok(bits / 8)
    }

    fn find_bits(&self, t: &Type, member: &str, depth: usize) -> Option<u32> {
        if depth > MAX_DEPTH {
            return None;
        }
        // A named member at this level wins over one nested deeper.
        if let Some(m) = t.members.iter().find(|m| self.name(m.name_off) == member) {
            return Some(m.bit_offset);
        }
        t.members
            .iter()
            .filter(|m| m.name_off == 0 || self.name(m.name_off).is_empty())
            .find_map(|m| {
                let inner = self.resolve(m.type_id)?;
                if inner.kind != KIND_STRUCT && inner.kind != KIND_UNION {
                    return None;
                }
                let nested = self.find_bits(inner, member, depth + 1)?;
                m.bit_offset.checked_add(nested)
            })
    }
}

/// The running kernel's BTF for a test, or `None` (said on stderr) only
/// where the kernel has none: one that exists but does not parse fails.
#[cfg(test)]
pub(super) fn kernel_btf_or_skip() -> Option<Btf> {
    match Btf::from_kernel() {
        Ok(btf) => Some(btf),
        Err(_) => {
            assert!(
                !std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
                "vmlinux BTF exists but did not parse"
            );
            eprintln!("skipped: this kernel exposes no /sys/kernel/btf/vmlinux");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, trailing words).
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn record(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, extra: u32) {
            let name = self.string(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            for w in [name, info, extra] {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        fn word(&mut self, w: u32) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }

        fn member(&mut self, name: &str, type_id: u32, bit_offset: u32) {
            let name = self.string(name);
            self.word(name);
            self.word(type_id);
            self.word(bit_offset);
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// [1] int, [2] ptr->1, [3] anonymous struct { a @0, pad:int @64 }
    /// (with a bitfield flag), [4] typedef anon = 3, [5] union { x @0; anon
    /// struct (via typedef 4) @0 }, [6] struct outer { first @0; <anon union
    /// 5> @128; tail @512; bits:int (bitfield at bit 516) }, an enum and a
    /// func_proto in between to exercise skipping.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.record("int", KIND_INT, 0, false, 4); // 1
        b.word(32);
        b.record("", KIND_PTR, 0, false, 1); // 2
        b.record("", KIND_STRUCT, 2, true, 16); // 3
        b.member("exe_file", 2, 0);
        b.member("pad", 1, (32 << 24) | 64);
        b.record("anon_t", KIND_TYPEDEF, 0, false, 3); // 4
        b.record("", KIND_ENUM, 2, false, 4); // 5
        b.word(0);
        b.word(0);
        b.word(0);
        b.word(1);
        b.record("", KIND_FUNC_PROTO, 1, false, 1); // 6
        b.word(0);
        b.word(1);
        b.record("", KIND_UNION, 2, false, 16); // 7
        b.member("x", 1, 0);
        b.member("", 4, 0);
        b.record("outer", KIND_STRUCT, 4, true, 80); // 8
        b.member("first", 1, 0);
        b.member("", 7, 128);
        b.member("tail", 2, 512);
        b.member("bits", 1, (3 << 24) | 516);
        b.build()
    }

    #[test]
    fn finds_direct_and_nested_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "first"), Ok(0));
        assert_eq!(btf.member_offset("outer", "tail"), Ok(64));
        assert_eq!(btf.member_offset("outer", "x"), Ok(16));
        // union @128 bits + typedef'd anonymous struct @0 + member @0.
        assert_eq!(btf.member_offset("outer", "exe_file"), Ok(16));
        // Bitfield offsets are taken from the low 24 bits.
        assert_eq!(btf.member_offset("outer", "pad"), Ok(16 + 8));
        assert!(matches!(
            btf.member_offset("outer", "bits"),
            Err(BtfError::Unaligned { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "missing"),
            Err(BtfError::NoMember { .. })
        ));
        assert_eq!(
            btf.member_offset("nope", "first"),
            Err(BtfError::NoStruct("nope".into()))
        );
    }

    #[test]
    fn rejects_malformed_blobs() {
        let good = sample();
        assert!(matches!(Btf::parse(&[]), Err(BtfError::Malformed(_))));
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb, 1, 0]),
            Err(BtfError::Malformed(_))
        ));
        let mut wrong_magic = good.clone();
        wrong_magic[0] = 0;
        assert!(matches!(
            Btf::parse(&wrong_magic),
            Err(BtfError::Malformed(_))
        ));
        // Every truncation is an error, not a panic.
        for cut in 0..good.len() {
            assert!(Btf::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A type section that ends inside a record.
        let mut b = Builder::new();
        b.record("s", KIND_STRUCT, 3, false, 8);
        b.member("a", 0, 0);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::Malformed(_))
        ));
        let mut b = Builder::new();
        b.record("k", 31, 0, false, 0);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn a_self_referencing_anonymous_member_does_not_loop() {
        let mut b = Builder::new();
        b.record("", KIND_STRUCT, 1, false, 8); // 1: contains itself
        b.member("", 1, 0);
        b.record("loop", KIND_STRUCT, 1, false, 8); // 2
        b.member("", 1, 0);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(btf.member_offset("loop", "x").is_err());
    }

    #[test]
    fn running_kernel_offsets_are_found() {
        let Some(btf) = kernel_btf_or_skip() else {
            return;
        };
        for (strukt, member) in super::super::task_identity::FIELDS {
            let off = btf.member_offset(strukt, member);
            assert!(off.is_ok(), "{strukt}.{member}: {off:?}");
        }
        // mm_struct keeps its fields in an anonymous struct on recent
        // kernels; exe_file lies well inside it.
        assert!(btf.member_offset("mm_struct", "exe_file").unwrap() > 0);
        assert_ne!(
            btf.member_offset("task_struct", "mm"),
            btf.member_offset("task_struct", "group_leader")
        );
    }
}
