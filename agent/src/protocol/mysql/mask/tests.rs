use super::*;
use crate::masking::ColumnSpec;

/// A column definition packet as a server sends it.
fn definition(
    schema: &str,
    org_table: &str,
    org_name: &str,
    column_type: u8,
    flags: u16,
) -> Vec<u8> {
    let mut p = Vec::new();
    for s in ["def", schema, "alias", org_table, "label", org_name] {
        put_lenenc_bytes(&mut p, s.as_bytes());
    }
    p.push(0x0c);
    let charset: u16 = if matches!(column_type, column_type::VAR_STRING | column_type::BLOB) {
        45
    } else {
        BINARY_CHARSET
    };
    p.extend_from_slice(&charset.to_le_bytes());
    p.extend_from_slice(&100u32.to_le_bytes());
    p.push(column_type);
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&[0, 0, 0]);
    p
}

fn plan(columns: &[&str], with: MaskMethod, computed: Option<MaskMethod>) -> MaskPlan {
    MaskPlan {
        rules: vec![Arc::new(MaskRule {
            columns: columns
                .iter()
                .map(|c| ColumnSpec::parse(c).unwrap())
                .collect(),
            with,
        })],
        computed,
    }
}

fn text_row(values: &[Option<&str>]) -> Vec<u8> {
    let mut row = Vec::new();
    for v in values {
        match v {
            Some(v) => put_lenenc_bytes(&mut row, v.as_bytes()),
            None => row.push(TEXT_NULL),
        }
    }
    row
}

#[test]
fn fields_are_masked_by_the_column_they_come_from() {
    let plan = plan(&["shop.customers.email"], MaskMethod::Redact, None);
    let field = |schema, table, name, t| {
        plan.field(&ColumnDefinition::parse(&definition(schema, table, name, t, 0)).unwrap())
    };
    let text = column_type::VAR_STRING;
    assert_eq!(
        field("shop", "customers", "email", text),
        Some(Replacement::Text(b"****"))
    );
    assert_eq!(
        field("shop", "Customers", "EMAIL", text),
        Some(Replacement::Text(b"****"))
    );
    // Another database's table of the same name, another column.
    assert_eq!(field("other", "customers", "email", text), None);
    assert_eq!(field("shop", "customers", "id", text), None);
    // Not text: NULL.
    assert_eq!(
        field("shop", "customers", "email", column_type::LONG),
        Some(Replacement::Null)
    );
    // Computed, in a statement whose expressions cannot read email: kept.
    assert_eq!(field("", "", "", text), None);

    let strict = super::tests::plan(&["email"], MaskMethod::Redact, Some(MaskMethod::Null));
    let computed = ColumnDefinition::parse(&definition("", "", "", text, 0)).unwrap();
    assert_eq!(strict.field(&computed), Some(Replacement::Null));
    // A union's column names a column but no table: computed.
    let union = ColumnDefinition::parse(&definition("", "", "id", text, 0)).unwrap();
    assert_eq!(strict.field(&union), Some(Replacement::Null));
}

#[test]
fn text_rows_are_rewritten_field_by_field() {
    let plan = plan(&["customers.email"], MaskMethod::Redact, None);
    let mut mask = ResultMask::default();
    for d in [
        definition("shop", "customers", "id", column_type::LONG, NOT_NULL_FLAG),
        definition("shop", "customers", "email", column_type::VAR_STRING, 0),
        definition("shop", "customers", "name", column_type::VAR_STRING, 0),
    ] {
        let mut d = d;
        mask.add(&plan, &mut d).unwrap();
    }
    let row = text_row(&[Some("1"), Some("ann@example.com"), Some("Ann")]);
    assert_eq!(
        mask.text_row(&row).unwrap(),
        Some(text_row(&[Some("1"), Some("****"), Some("Ann")]))
    );
    let row = text_row(&[Some("2"), None, None]);
    assert_eq!(
        mask.text_row(&row).unwrap(),
        Some(text_row(&[Some("2"), None, None]))
    );
    // Rows that do not match their columns are not passed on.
    assert!(mask.text_row(&text_row(&[Some("1"), Some("a")])).is_err());
    let mut long = text_row(&[Some("1"), Some("a"), Some("b")]);
    long.push(0);
    assert!(mask.text_row(&long).is_err());
    assert!(mask.text_row(&[0xFC, 0xFF]).is_err());
}

#[test]
fn a_column_masked_to_null_loses_its_not_null_flag() {
    let plan = plan(&["customers.id"], MaskMethod::Null, None);
    let mut mask = ResultMask::default();
    let mut d = definition(
        "shop",
        "customers",
        "id",
        column_type::LONG,
        NOT_NULL_FLAG | 0x2,
    );
    mask.add(&plan, &mut d).unwrap();
    let parsed = ColumnDefinition::parse(&d).unwrap();
    assert_eq!(parsed.flags, 0x2);
    let mut kept = definition(
        "shop",
        "customers",
        "other",
        column_type::LONG,
        NOT_NULL_FLAG,
    );
    mask.add(&plan, &mut kept).unwrap();
    assert_eq!(ColumnDefinition::parse(&kept).unwrap().flags, NOT_NULL_FLAG);
}

#[test]
fn binary_rows_are_rewritten_field_by_field() {
    let plan = plan(
        &["customers.email", "customers.born"],
        MaskMethod::Redact,
        None,
    );
    let mut mask = ResultMask::default();
    for d in [
        definition("shop", "customers", "id", column_type::LONGLONG, 0),
        definition("shop", "customers", "email", column_type::VAR_STRING, 0),
        definition("shop", "customers", "born", column_type::DATE, 0),
        definition("shop", "customers", "score", column_type::DOUBLE, 0),
        definition("shop", "customers", "note", column_type::BLOB, 0),
    ] {
        let mut d = d;
        mask.add(&plan, &mut d).unwrap();
    }
    // id 7, email, born 2001-02-03, score NULL, note "hi".
    let mut row = vec![0x00, 0b0010_0000];
    row.extend_from_slice(&7u64.to_le_bytes());
    put_lenenc_bytes(&mut row, b"ann@example.com");
    row.extend_from_slice(&[4, 0xD1, 0x07, 2, 3]);
    put_lenenc_bytes(&mut row, b"hi");

    let mut want = vec![0x00, 0b0011_0000];
    want.extend_from_slice(&7u64.to_le_bytes());
    put_lenenc_bytes(&mut want, b"****");
    put_lenenc_bytes(&mut want, b"hi");
    assert_eq!(mask.binary_row(&row).unwrap(), Some(want));

    assert!(mask.binary_row(&row[..row.len() - 1]).is_err());
    assert!(mask.binary_row(&[0x01, 0, 0]).is_err());
}

#[test]
fn errors_of_masked_statements_keep_their_code_but_not_their_values() {
    let quoting = crate::protocol::mysql::packet::err_payload(
        1292,
        "22007",
        "Truncated incorrect DOUBLE value: 'ann@example.com'",
    );
    let withheld = withheld_error(&quoting);
    let text = String::from_utf8_lossy(&withheld);
    assert!(!text.contains("ann@example.com"), "{text}");
    assert!(
        text.contains("#22007") && text.contains("withheld"),
        "{text}"
    );
    assert_eq!(&withheld[1..3], &1292u16.to_le_bytes());

    let syntax = crate::protocol::mysql::packet::err_payload(1064, "42000", "near 'x'");
    assert_eq!(withheld_error(&syntax), syntax);
}

#[test]
fn warning_counts_are_taken_from_ok_and_eof_packets() {
    let mut eof = vec![0xFE, 3, 0, 0x22, 0];
    assert_eq!(take_warnings(&mut eof), 3);
    assert_eq!(eof, [0xFE, 0, 0, 0x22, 0]);
    let mut ok = vec![0x00, 0xFC, 0x10, 0x01, 0, 0x02, 0, 2, 0];
    assert_eq!(take_warnings(&mut ok), 2);
    assert_eq!(ok, [0x00, 0xFC, 0x10, 0x01, 0, 0x02, 0, 0, 0]);
    assert_eq!(take_warnings(&mut [0xFF, 1, 2]), 0);
}
