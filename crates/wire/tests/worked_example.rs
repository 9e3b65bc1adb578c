//! The worked example in docs/formats/replication-log.md is what the writer produces, byte for
//! byte, and it verifies. Run with `PRINT_EXAMPLE=1` to print the bytes when the format changes.

use wire::{verify, Compression, DiskInfo, Expect, LogHeader, LogWriter, PointType};

const DOC: &str = include_str!("../../../docs/formats/replication-log.md");

fn example() -> Vec<u8> {
    let vm = uuid::Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);
    let header = LogHeader {
        vm,
        relationship: 0,
        sequence: 1,
        parent: 0,
        point_time_micros: 1_700_000_000_000_000,
        point_type: PointType::Standard,
        full_image: true,
        disks: vec![DiskInfo {
            id: "d0".into(),
            virtual_size: 4096,
        }],
    };
    let mut w = LogWriter::new(Vec::new(), header, Compression::Off).expect("writer");
    w.write_data(0, 512, &[0xab; 4]).expect("data");
    w.write_zero(0, 1024, 512).expect("zero");
    let (log, _) = w.finish().expect("finish");
    let expect = Expect {
        vm,
        relationship: 0,
        sequence: 1,
        parent: 0,
    };
    verify(&log[..], &expect).expect("the example verifies");
    log
}

/// The hex digits of the first code block after the "Worked example" heading.
fn documented_bytes() -> Vec<u8> {
    let section = DOC.split("## Worked example").nth(1).expect("section");
    let block = section.split("```").nth(1).expect("code block");
    let digits: String = block
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .flat_map(|line| line.chars().filter(char::is_ascii_hexdigit))
        .collect();
    (0..digits.len() / 2)
        .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn the_documented_example_is_what_the_writer_writes() {
    let log = example();
    if std::env::var_os("PRINT_EXAMPLE").is_some() {
        let hex: Vec<String> = log.iter().map(|b| format!("{b:02x}")).collect();
        println!("{}", hex.join(" "));
    }
    assert_eq!(documented_bytes(), log);
}
