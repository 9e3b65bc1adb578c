//! `vmreplica-bench data-plane`: change tracking and shipping, side by side with rsync and
//! qemu-img convert, in one run (issue 3's benchmark). Not part of CI.
//!
//! An image of `--size` holding random data is changed by random 64 KiB writes covering
//! `--change-percent` of it, made by a "guest" through qemu-storage-daemon while a dirty bitmap
//! tracks them. Then, each timed on its own: the bitmap engine freezes the point and writes the
//! replication log; the hash-scan engine compares the image with the block-hash map of the
//! previous version and writes the log; `rsync --no-whole-file --inplace` brings a copy of the old
//! raw image up to date; `qemu-img convert` makes a full copy. Every engine runs in a child process
//! so its peak memory (ru_maxrss) is measured on its own.

mod engines;
mod measure;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmreplica-bench")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// The data-plane benchmark.
    DataPlane {
        /// Image size (bytes, or with K/M/G suffix).
        #[arg(long, default_value = "8G")]
        size: String,
        /// Share of the 64 KiB blocks the guest rewrites.
        #[arg(long, default_value_t = 1.0)]
        change_percent: f64,
        /// Working directory (needs about 4x the image size free).
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
        /// Drop the page cache before every timed step (needs root), so every tool reads its
        /// input from the disk.
        #[arg(long)]
        cold: bool,
    },
    /// (internal) one engine, run in a child process so its memory is measured alone.
    #[command(hide = true)]
    Engine { name: String, dir: PathBuf },
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    vmreplica_core::command::parse_bytes(text).with_context(|| format!("'{text}' is not a size"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.what {
        What::DataPlane {
            size,
            change_percent,
            dir,
            cold,
        } => {
            let size = parse_size(&size)?;
            rt.block_on(engines::data_plane(size, change_percent, &dir, cold))
        }
        What::Engine { name, dir } => rt.block_on(engines::run_engine(&name, &dir)),
    }
}
