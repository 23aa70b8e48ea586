//! Masking MySQL results (see [`crate::masking`] for what is masked).
//!
//! A MySQL server says where each result column comes from: every column
//! definition carries the database, the table and the column it was read
//! from (`schema`, `org_table`, `org_name`), empty for a computed value.
//! So no catalog lookup is needed: a field is masked when a rule names its
//! origin, and a computed field of a masked statement is masked when the
//! statement's expressions may read a masked column. The origin holds only
//! for columns read straight from a table: through a derived table or a
//! `WITH` query the server reports the derived name as the origin, so such
//! statements are refused before they run (`masking::mask_obstacle`).
//!
//! Text rows (`COM_QUERY`) and binary rows (`COM_STMT_EXECUTE`,
//! `COM_STMT_FETCH`) are both rewritten. A masked value becomes
//! [`crate::masking::REDACTED`] in a text column or NULL, and a column
//! masked to NULL loses its `NOT NULL` flag so that clients accept it.
//!
//! What a masked statement makes the server say besides its rows is
//! withheld too: an error's message (unless it can quote only the
//! statement's own text) and the warnings, which quote values
//! (`Truncated incorrect DOUBLE value: 'ann@example.com'`). The session
//! clears the server's list of warnings after the statement, so that `SHOW
//! WARNINGS` finds nothing.

use std::sync::Arc;

use super::packet::lenenc_int;
use crate::masking::{MaskMethod, MaskRule, Replacement};

/// What one masked command needs masked, made when it was decided.
#[derive(Debug, Clone)]
pub struct MaskPlan {
    /// The mask rules that applied.
    pub rules: Vec<Arc<MaskRule>>,
    /// The method for computed fields when the statement's expressions may
    /// read a masked column; `None` when they cannot.
    pub computed: Option<MaskMethod>,
}

/// Column types (`MYSQL_TYPE_*`).
mod column_type {
    pub(super) const DECIMAL: u8 = 0x00;
    pub(super) const TINY: u8 = 0x01;
    pub(super) const SHORT: u8 = 0x02;
    pub(super) const LONG: u8 = 0x03;
    pub(super) const FLOAT: u8 = 0x04;
    pub(super) const DOUBLE: u8 = 0x05;
    pub(super) const NULL: u8 = 0x06;
    pub(super) const TIMESTAMP: u8 = 0x07;
    pub(super) const LONGLONG: u8 = 0x08;
    pub(super) const INT24: u8 = 0x09;
    pub(super) const DATE: u8 = 0x0a;
    pub(super) const TIME: u8 = 0x0b;
    pub(super) const DATETIME: u8 = 0x0c;
    pub(super) const YEAR: u8 = 0x0d;
    pub(super) const NEWDATE: u8 = 0x0e;
    pub(super) const VARCHAR: u8 = 0x0f;
    pub(super) const BIT: u8 = 0x10;
    pub(super) const TIMESTAMP2: u8 = 0x11;
    pub(super) const DATETIME2: u8 = 0x12;
    pub(super) const TIME2: u8 = 0x13;
    pub(super) const JSON: u8 = 0xf5;
    pub(super) const NEWDECIMAL: u8 = 0xf6;
    pub(super) const ENUM: u8 = 0xf7;
    pub(super) const SET: u8 = 0xf8;
    pub(super) const TINY_BLOB: u8 = 0xf9;
    pub(super) const MEDIUM_BLOB: u8 = 0xfa;
    pub(super) const LONG_BLOB: u8 = 0xfb;
    pub(super) const BLOB: u8 = 0xfc;
    pub(super) const VAR_STRING: u8 = 0xfd;
    pub(super) const STRING: u8 = 0xfe;
    pub(super) const GEOMETRY: u8 = 0xff;
}

/// Column definition flags.
const NOT_NULL_FLAG: u16 = 0x0001;
const ENUM_FLAG: u16 = 0x0100;
const SET_FLAG: u16 = 0x0800;
/// The character set number of binary strings.
const BINARY_CHARSET: u16 = 63;
/// The lenenc NULL of a text row.
const TEXT_NULL: u8 = 0xFB;

/// A field's origin and type, from its column definition packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDefinition {
    /// The database of the table it was read from (empty when computed).
    pub schema: Vec<u8>,
    /// The table it was read from, by its own name (empty when computed).
    pub org_table: Vec<u8>,
    /// The column it was read from (empty when computed).
    pub org_name: Vec<u8>,
    /// Its character set number.
    pub charset: u16,
    /// Its type (`MYSQL_TYPE_*`).
    pub column_type: u8,
    /// Its flags.
    pub flags: u16,
    /// Where the flags are in the packet.
    flags_at: usize,
}

/// A packet the masking cannot read: the session ends rather than pass on
/// something it could not mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub &'static str);

impl ColumnDefinition {
    /// Reads a column definition (protocol 4.1).
    pub fn parse(payload: &[u8]) -> Result<ColumnDefinition, Unreadable> {
        const CUT: Unreadable = Unreadable("a column definition cut short");
        let mut at = 0;
        let mut strings: Vec<&[u8]> = Vec::with_capacity(6);
        for _ in 0..6 {
            let (len, n) = lenenc_int(payload.get(at..).ok_or(CUT)?).ok_or(CUT)?;
            let start = at + n;
            let end = usize::try_from(len)
                .ok()
                .and_then(|len| start.checked_add(len))
                .ok_or(CUT)?;
            strings.push(payload.get(start..end).ok_or(CUT)?);
            at = end;
        }
        // The length of the fixed fields (0x0c), then character set (2),
        // display length (4), type (1), flags (2), decimals (1).
        let fixed = payload.get(at..at + 11).ok_or(CUT)?;
        Ok(ColumnDefinition {
            schema: strings[1].to_vec(),
            org_table: strings[3].to_vec(),
            org_name: strings[5].to_vec(),
            charset: u16::from_le_bytes([fixed[1], fixed[2]]),
            column_type: fixed[7],
            flags: u16::from_le_bytes([fixed[8], fixed[9]]),
            flags_at: at + 8,
        })
    }

    /// Whether its values are text that [`crate::masking::REDACTED`] can
    /// stand for (not binary strings, enums, sets, JSON or numbers).
    pub fn is_text(&self) -> bool {
        use column_type::*;
        matches!(
            self.column_type,
            VARCHAR | VAR_STRING | STRING | TINY_BLOB | MEDIUM_BLOB | LONG_BLOB | BLOB
        ) && self.charset != BINARY_CHARSET
            && self.flags & (ENUM_FLAG | SET_FLAG) == 0
    }
}

impl MaskPlan {
    /// What happens to the field `column` defines: masked when a rule names
    /// the column it was read from, or when it is computed and the
    /// statement's expressions may read a masked column.
    pub fn field(&self, column: &ColumnDefinition) -> Option<Replacement> {
        let method = if column.org_table.is_empty() || column.org_name.is_empty() {
            self.computed
        } else {
            match (
                std::str::from_utf8(&column.schema),
                std::str::from_utf8(&column.org_table),
                std::str::from_utf8(&column.org_name),
            ) {
                (Ok(schema), Ok(table), Ok(name)) => {
                    let schema = (!schema.is_empty()).then_some(schema);
                    self.rules
                        .iter()
                        .filter(|rule| rule.columns.iter().any(|c| c.names(schema, table, name)))
                        .map(|rule| rule.with)
                        .max()
                }
                // Names the rules cannot be compared with: masked.
                _ => self.rules.iter().map(|rule| rule.with).max(),
            }
        };
        method.map(|m| m.replacement(column.is_text()))
    }
}

/// How the fields of one result set are masked.
#[derive(Debug, Clone, Default)]
pub struct ResultMask {
    /// Per field: its type, and what it becomes when masked.
    fields: Vec<(u8, Option<Replacement>)>,
}

impl ResultMask {
    /// Adds the next field; the column definition comes back rewritten
    /// when it must lose its `NOT NULL` flag.
    pub fn add(&mut self, plan: &MaskPlan, definition: &mut [u8]) -> Result<(), Unreadable> {
        let column = ColumnDefinition::parse(definition)?;
        let replacement = plan.field(&column);
        if replacement == Some(Replacement::Null) && column.flags & NOT_NULL_FLAG != 0 {
            let flags = (column.flags & !NOT_NULL_FLAG).to_le_bytes();
            definition[column.flags_at..column.flags_at + 2].copy_from_slice(&flags);
        }
        self.fields.push((column.column_type, replacement));
        Ok(())
    }

    /// Whether any field is masked.
    pub fn masks_any(&self) -> bool {
        self.fields.iter().any(|(_, r)| r.is_some())
    }

    /// A text row with its masked fields replaced (`None`: unchanged).
    pub fn text_row(&self, row: &[u8]) -> Result<Option<Vec<u8>>, Unreadable> {
        const CUT: Unreadable = Unreadable("a text row that does not match its columns");
        if !self.masks_any() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(row.len());
        let mut at = 0;
        for (_, replacement) in &self.fields {
            let start = at;
            let is_null = row.get(at) == Some(&TEXT_NULL);
            if is_null {
                at += 1;
            } else {
                let (len, n) = lenenc_int(row.get(at..).ok_or(CUT)?).ok_or(CUT)?;
                at = usize::try_from(len)
                    .ok()
                    .and_then(|len| (at + n).checked_add(len))
                    .filter(|end| *end <= row.len())
                    .ok_or(CUT)?;
            }
            match replacement {
                Some(_) if is_null => out.push(TEXT_NULL),
                Some(Replacement::Null) => out.push(TEXT_NULL),
                Some(Replacement::Text(text)) => put_lenenc_bytes(&mut out, text),
                None => out.extend_from_slice(&row[start..at]),
            }
        }
        if at != row.len() {
            return Err(CUT);
        }
        Ok(Some(out))
    }

    /// A binary row (prepared statements) with its masked fields replaced
    /// (`None`: unchanged).
    pub fn binary_row(&self, row: &[u8]) -> Result<Option<Vec<u8>>, Unreadable> {
        const CUT: Unreadable = Unreadable("a binary row that does not match its columns");
        if !self.masks_any() {
            return Ok(None);
        }
        let bitmap_len = (self.fields.len() + 7 + 2) / 8;
        if row.first() != Some(&0x00) {
            return Err(Unreadable("a binary row without its header"));
        }
        let mut bitmap = row.get(1..1 + bitmap_len).ok_or(CUT)?.to_vec();
        let is_null = |bitmap: &[u8], i: usize| bitmap[(i + 2) / 8] & (1 << ((i + 2) % 8)) != 0;
        let mut values = Vec::with_capacity(row.len());
        let mut at = 1 + bitmap_len;
        for (i, (column_type, replacement)) in self.fields.iter().enumerate() {
            if is_null(&bitmap, i) {
                continue;
            }
            let len = binary_value_len(*column_type, row.get(at..).ok_or(CUT)?)?;
            let end = at
                .checked_add(len)
                .filter(|end| *end <= row.len())
                .ok_or(CUT)?;
            match replacement {
                None => values.extend_from_slice(&row[at..end]),
                Some(Replacement::Text(text)) => put_lenenc_bytes(&mut values, text),
                Some(Replacement::Null) => bitmap[(i + 2) / 8] |= 1 << ((i + 2) % 8),
            }
            at = end;
        }
        if at != row.len() {
            return Err(CUT);
        }
        let mut out = Vec::with_capacity(1 + bitmap.len() + values.len());
        out.push(0x00);
        out.extend_from_slice(&bitmap);
        out.extend_from_slice(&values);
        Ok(Some(out))
    }
}

/// The length of one binary-protocol value of `column_type` at the start
/// of `bytes`.
fn binary_value_len(column_type: u8, bytes: &[u8]) -> Result<usize, Unreadable> {
    use column_type::*;
    const CUT: Unreadable = Unreadable("a binary value cut short");
    Ok(match column_type {
        NULL => 0,
        TINY => 1,
        SHORT | YEAR => 2,
        LONG | INT24 | FLOAT => 4,
        LONGLONG | DOUBLE => 8,
        DATE | DATETIME | TIMESTAMP | TIME | NEWDATE | TIMESTAMP2 | DATETIME2 | TIME2 => {
            1 + usize::from(*bytes.first().ok_or(CUT)?)
        }
        DECIMAL | NEWDECIMAL | VARCHAR | BIT | JSON | ENUM | SET | TINY_BLOB | MEDIUM_BLOB
        | LONG_BLOB | BLOB | VAR_STRING | STRING | GEOMETRY => {
            let (len, n) = lenenc_int(bytes).ok_or(CUT)?;
            usize::try_from(len)
                .ok()
                .and_then(|len| len.checked_add(n))
                .ok_or(CUT)?
        }
        _ => {
            return Err(Unreadable(
                "a binary value of a type the agent does not know",
            ))
        }
    })
}

/// Appends `bytes` as a length-encoded string.
fn put_lenenc_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if len < 0xFB {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(0xFC);
        out.extend_from_slice(&(len as u16).to_le_bytes());
    } else if len <= 0xFF_FFFF {
        out.push(0xFD);
        out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xFE);
        out.extend_from_slice(&(len as u64).to_le_bytes());
    }
    out.extend_from_slice(bytes);
}

/// Errors whose message quotes only the statement's own text or names
/// (a syntax error, an unknown table, column or function, a missing
/// privilege): passed on whole for a masked statement.
const TEXT_ONLY_ERRORS: &[u16] = &[
    1044, // ER_DBACCESS_DENIED_ERROR
    1046, // ER_NO_DB_ERROR
    1049, // ER_BAD_DB_ERROR
    1052, // ER_NON_UNIQ_ERROR
    1054, // ER_BAD_FIELD_ERROR
    1060, // ER_DUP_FIELDNAME
    1064, // ER_PARSE_ERROR
    1142, // ER_TABLEACCESS_DENIED_ERROR
    1143, // ER_COLUMNACCESS_DENIED_ERROR
    1146, // ER_NO_SUCH_TABLE
    1222, // ER_WRONG_NUMBER_OF_COLUMNS_IN_SELECT
    1241, // ER_OPERAND_COLUMNS
    1305, // ER_SP_DOES_NOT_EXIST
    1317, // ER_QUERY_INTERRUPTED
    1582, // ER_WRONG_PARAMCOUNT_TO_NATIVE_FCT
    1630, // ER_FUNC_INEXISTENT_NAME_COLLISION
];

/// The ERR packet of a masked statement as the client gets it: its code
/// and SQLSTATE kept, its message withheld unless it can quote only the
/// statement's text.
pub fn withheld_error(payload: &[u8]) -> Vec<u8> {
    let Some(code) = payload.get(1..3).map(|b| u16::from_le_bytes([b[0], b[1]])) else {
        return payload.to_vec();
    };
    if TEXT_ONLY_ERRORS.contains(&code) {
        return payload.to_vec();
    }
    let sql_state = match payload.get(3..9) {
        Some([b'#', state @ ..]) => std::str::from_utf8(state).unwrap_or("HY000"),
        _ => "HY000",
    };
    super::packet::err_payload(
        code,
        sql_state,
        &format!(
            "tollgate: the server's message for error {code} is withheld: the statement reads masked columns, and the message may quote their values"
        ),
    )
}

/// Sets the warning count of an OK or EOF packet to zero; the count it
/// had.
pub fn take_warnings(payload: &mut [u8]) -> u16 {
    let at = match payload.first() {
        Some(0xFE) if payload.len() < 9 => Some(1),
        Some(0x00) => payload.get(1..).and_then(lenenc_int).and_then(|(_, a)| {
            let (_, b) = lenenc_int(payload.get(1 + a..)?)?;
            Some(1 + a + b + 2)
        }),
        _ => None,
    };
    let Some(warnings) = at.and_then(|at| payload.get_mut(at..at + 2)) else {
        return 0;
    };
    let count = u16::from_le_bytes([warnings[0], warnings[1]]);
    warnings.copy_from_slice(&[0, 0]);
    count
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests;
