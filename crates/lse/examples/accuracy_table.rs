//! Prints the measured accuracy table (op × dtype × distribution → worst error in ulps) for the
//! README, against the same 192-bit oracle and with the same measurement code as
//! `tests/accuracy.rs`, on more rows.
//!
//! ```text
//! cargo run --release -p lse --example accuracy_table [-- [--scalar] [DATE]]
//! ```
//!
//! `DATE` is printed in the header (default: today's UTC date from the system clock);
//! `--scalar` measures the scalar reference kernel instead of the dispatched one.

use std::time::{SystemTime, UNIX_EPOCH};

use lse_testkit::measure;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--scalar") {
        lse::set_kernel(lse::Kernel::Scalar);
    }
    let date = args
        .into_iter()
        .find(|a| a != "--scalar")
        .unwrap_or_else(today_utc);
    eprintln!("measuring the {} kernel", lse::active_kernel().name());
    let report = measure::run(&measure::Plan::full());
    println!("## Accuracy\n");
    print!("{}", report.markdown(&date));
    let mut failures = report.failures(&measure::Op::ALL);
    failures.extend(report.variant_failures());
    if !failures.is_empty() {
        println!("\n{} cell(s) above target; worst inputs:\n", failures.len());
        for f in failures {
            println!("- {f}");
        }
    }
}

/// `YYYY-MM-DD` (UTC) from the system clock, by the civil-from-days algorithm (no dependency).
fn today_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
