//! Just enough of ELF64 (little endian) to list the program and map sections
//! of the kernel object: section headers, their names, and the symbols that
//! live in them. Every offset read from the file is bounds-checked.

use anyhow::{bail, Context, Result};

/// A symbol defined in a section of the object.
pub(crate) struct Symbol {
    pub(crate) name: String,
    pub(crate) size: u64,
    /// `STT_FUNC` (2) or `STT_OBJECT` (1), as in the ELF spec.
    pub(crate) kind: u8,
    /// `STB_GLOBAL` (1) or `STB_LOCAL` (0), ...
    pub(crate) binding: u8,
}

/// A section with the symbols defined in it.
pub(crate) struct Section {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) executable: bool,
    pub(crate) symbols: Vec<Symbol>,
}

const SHF_EXECINSTR: u64 = 0x4;
const SHT_SYMTAB: u32 = 2;
const EM_BPF: u16 = 247;

fn bytes<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N]> {
    let end = at.checked_add(N).context("offset overflow")?;
    let slice = data
        .get(at..end)
        .with_context(|| format!("truncated ELF: {N} bytes at {at}"))?;
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    Ok(out)
}
fn u16_at(d: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(bytes(d, at)?))
}
fn u32_at(d: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(bytes(d, at)?))
}
fn u64_at(d: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(bytes(d, at)?))
}
fn usize_at(d: &[u8], at: usize) -> Result<usize> {
    usize::try_from(u64_at(d, at)?).context("offset does not fit usize")
}

/// The NUL-terminated string at `offset` of the string table `table`.
fn c_str(data: &[u8], table: (usize, usize), offset: usize) -> Result<String> {
    let (start, size) = table;
    let table_end = start.checked_add(size).context("string table overflow")?;
    let table = data
        .get(start..table_end)
        .context("string table outside the file")?;
    let tail = table
        .get(offset..)
        .context("string offset outside its table")?;
    let len = tail
        .iter()
        .position(|&b| b == 0)
        .context("unterminated string")?;
    Ok(String::from_utf8_lossy(&tail[..len]).into_owned())
}

struct RawSection {
    name_off: usize,
    kind: u32,
    flags: u64,
    offset: usize,
    size: usize,
    link: u32,
    entsize: usize,
}

/// The sections of a little-endian ELF64 eBPF object, with their symbols.
pub(crate) fn sections(data: &[u8]) -> Result<Vec<Section>> {
    if data.get(..4) != Some(b"\x7fELF".as_slice()) {
        bail!("not an ELF file");
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        bail!("not a little-endian ELF64 object (expected bpfel)");
    }
    let machine = u16_at(data, 18)?;
    if machine != EM_BPF {
        bail!("ELF machine is {machine}, not BPF ({EM_BPF})");
    }
    let shoff = usize_at(data, 0x28)?;
    let shentsize = usize::from(u16_at(data, 0x3a)?);
    let shnum = usize::from(u16_at(data, 0x3c)?);
    let shstrndx = usize::from(u16_at(data, 0x3e)?);
    if shentsize < 64 {
        bail!("section header entries of {shentsize} bytes are too small");
    }
    let mut raw = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let at = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .context("section header offset overflow")?;
        raw.push(RawSection {
            name_off: u32_at(data, at)? as usize,
            kind: u32_at(data, at + 4)?,
            flags: u64_at(data, at + 8)?,
            offset: usize_at(data, at + 0x18)?,
            size: usize_at(data, at + 0x20)?,
            link: u32_at(data, at + 0x28)?,
            entsize: usize_at(data, at + 0x38)?,
        });
    }
    let shstr = raw
        .get(shstrndx)
        .context("section name table index out of range")?;
    let shstr = (shstr.offset, shstr.size);
    let mut out = Vec::with_capacity(raw.len());
    for s in &raw {
        out.push(Section {
            name: c_str(data, shstr, s.name_off)?,
            size: s.size as u64,
            executable: s.flags & SHF_EXECINSTR != 0,
            symbols: Vec::new(),
        });
    }
    // Attach the symbols of the (single) symbol table to their sections.
    if let Some(symtab) = raw.iter().find(|s| s.kind == SHT_SYMTAB) {
        let strtab = raw
            .get(symtab.link as usize)
            .context("symbol string table index out of range")?;
        let strtab = (strtab.offset, strtab.size);
        let entsize = if symtab.entsize == 0 {
            24
        } else {
            symtab.entsize
        };
        for i in 0..symtab.size / entsize {
            let at = i
                .checked_mul(entsize)
                .and_then(|o| o.checked_add(symtab.offset))
                .context("symbol offset overflow")?;
            let name_off = u32_at(data, at)? as usize;
            let [info] = bytes::<1>(data, at + 4)?;
            let shndx = usize::from(u16_at(data, at + 6)?);
            let size = u64_at(data, at + 16)?;
            let kind = info & 0xf;
            if !(kind == 1 || kind == 2) {
                continue;
            }
            if let Some(section) = out.get_mut(shndx) {
                section.symbols.push(Symbol {
                    name: c_str(data, strtab, name_off)?,
                    size,
                    kind,
                    binding: info >> 4,
                });
            }
        }
    }
    Ok(out)
}
