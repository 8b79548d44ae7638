//! The command line, as one clap definition (also the source of the man page and completions).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "qrbd",
    version,
    about = "Replicated virtual disks in userspace: FUSE disk images replicated over QUIC",
    long_about = "qrbd exposes one disk image per resource under the node's mount directory \
                  (<mount_dir>/<resource>.img). Loop-mount it (losetup --direct-io=on), put a \
                  file system on it, and every write is replicated to the resource's peers."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive such as
    /// "qrbd=debug"); overrides RUST_LOG.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration file and print a summary.
    CheckConfig,
    /// Create the backing file and fresh metadata of a resource.
    CreateMd {
        resource: String,
        /// Replace existing metadata (starts a new data generation; data is kept).
        #[arg(long)]
        force: bool,
    },
    /// Run the node in the foreground (systemd runs this).
    Daemon,
    /// Bring a resource up on the running daemon.
    Up { resource: String },
    /// Take a resource down (refused while its image is open).
    Down { resource: String },
    /// Make this node Primary for a resource.
    Primary {
        resource: String,
        /// Promote even if the local data is not known to be up to date.
        #[arg(long)]
        force: bool,
    },
    /// Make this node Secondary for a resource (waits for in-flight I/O).
    Secondary { resource: String },
    /// Throw away this node's data of a resource: it becomes Inconsistent and takes every
    /// block from its peer (a full resync, now or when the peer connects).
    Invalidate { resource: String },
    /// Make the peer take every block of a resource from this node (a full resync).
    InvalidateRemote { resource: String },
    /// Online verify: compare every block with the peer's (SHA-256 digests), report the
    /// differing ones (`status`), mark them out of sync and resync them.
    Verify { resource: String },
    /// Skip the initial sync of a fresh resource whose replicas are all blank (new disks):
    /// with `--clear-bitmap`, every connected replica takes one new data generation and becomes
    /// UpToDate without copying a block. Without it, `primary --force` on one node starts the
    /// initial sync instead.
    NewCurrentUuid {
        resource: String,
        /// Declare the blank replicas identical (the only form qrbd supports: qrbd starts new
        /// generations on its own when a Primary writes without a peer).
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Show the state of one or all resources.
    Status {
        resource: Option<String>,
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Follow running resyncs (a progress bar on a terminal, plain lines otherwise) until
        /// none is left, then print the status.
        #[arg(long)]
        watch: bool,
    },
    /// Hold new application I/O of a resource until `resume-io`.
    SuspendIo { resource: String },
    /// Release application I/O held by `suspend-io`.
    ResumeIo { resource: String },
    /// Drop the resource's peer connections and stay StandAlone.
    Disconnect { resource: String },
    /// Connect the resource to its peers again.
    Connect {
        resource: String,
        /// After a split brain: this node gives up what it wrote since the split and takes
        /// the peer's data (a resync of the blocks either side changed).
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Stream every state change as one line (like `drbdsetup events2`); Ctrl-C ends it.
    Events,
    /// Create a CA (DIR/ca.crt, DIR/ca.key) if absent and, with --node, a node certificate
    /// signed by it (DIR/NAME.crt, DIR/NAME.key).
    GenCert {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Run the whole flow on a temporary node: FUSE image, loop device, ext4, a file, status.
    Demo {
        /// Size of the demo image.
        #[arg(long, default_value = "256MiB")]
        size: String,
    },
    /// Write the man pages and shell completions into DIR (used when building packages).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}
