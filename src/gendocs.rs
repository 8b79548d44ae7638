//! `qrbd generate-docs --out-dir DIR` (hidden): the man pages and shell completions, generated
//! from the clap definition in `cli.rs` so they never drift from the program. The packages are
//! built with them (`packaging/build.sh`).
//!
//! Layout under DIR:
//!
//! ```text
//! man8/qrbd.8                 qrbd(8), with FILES, ENVIRONMENT, SIGNALS and SEE ALSO
//! man8/qrbd-<command>.8       one page per (visible) subcommand
//! completions/qrbd.bash       bash
//! completions/_qrbd           zsh
//! completions/qrbd.fish       fish
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;

use crate::cli::Cli;

/// Section of the manual: system administration commands and daemons.
const SECTION: &str = "8";

/// Extra sections of qrbd(8), in roff.
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/qrbd/qrbd.toml\fR
The configuration (the default of \fB\-\-config\fR). The package ships it commented; set
\fBname\fR in \fB[node]\fR and add the resources before starting the daemon.
.TP
\fI/var/lib/qrbd\fR
Backing images (\fIRESOURCE\fB.img\fR) and metadata (\fIRESOURCE\fB.meta\fR): the data.
Removing the package keeps it.
.TP
\fI/run/qrbd/disks/RESOURCE.img\fR
The disk image of each resource that is up (FUSE). Attach it with
\fBlosetup \-\-direct\-io=on \-\-find \-\-show\fR.
.TP
\fI/run/qrbd/qrbd.sock\fR
The admin socket the commands talk to.
.SH ENVIRONMENT
.TP
\fBQRBD_NODE__\fIKEY\fR, \fBQRBD_TLS__\fIKEY\fR
Override a key of \fB[node]\fR or \fB[tls]\fR, e.g. \fBQRBD_NODE__NAME=beta\fR.
.TP
\fBRUST_LOG\fR
Log filter when \fB\-\-log\-level\fR is not given, e.g. \fBqrbd=debug\fR.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd (\fBType=notify\fR): the daemon reports readiness there.
.SH SIGNALS
\fBSIGTERM\fR or \fBSIGINT\fR stop the daemon: it refuses new I/O, finishes in\-flight
writes, flushes, unmounts the images and exits 0.
.SH EXAMPLES
.nf
qrbd check\-config
qrbd create\-md r0
systemctl enable \-\-now qrbd
qrbd primary r0
losetup \-\-direct\-io=on \-\-find \-\-show /run/qrbd/disks/r0.img
qrbd status \-\-json
.fi
.SH SEE ALSO
\fBlosetup\fR(8), \fBsystemctl\fR(1), \fBdrbdadm\fR(8),
\fI/usr/share/doc/qrbd/README.md\fR, \fI/usr/share/doc/qrbd/status\-json.md\fR
"#;

/// The clap command as the documentation sees it (no `help` subcommand; built, so that
/// subcommands carry their `qrbd-<name>` display names).
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The command without its hidden subcommands: clap_complete offers hidden subcommands too.
fn completion_command() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new("qrbd")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    cmd
}

/// Writes the man pages and completions under `out_dir`; returns the files written.
pub fn generate(out_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man_dir = out_dir.join(format!("man{SECTION}"));
    let completion_dir = out_dir.join("completions");
    for dir in [&man_dir, &completion_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut written = Vec::new();
    let cmd = command();

    let path = man_dir.join(format!("qrbd.{SECTION}"));
    std::fs::write(&path, main_page(&cmd)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = Man::new(sub.clone()).section(SECTION);
        let path = man
            .generate_to(&man_dir)
            .with_context(|| format!("cannot write the page of {}", sub.get_name()))?;
        written.push(path);
    }

    for (shell, file) in [
        (Shell::Bash, "qrbd.bash"),
        (Shell::Zsh, "_qrbd"),
        (Shell::Fish, "qrbd.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut completion_command(), "qrbd", &mut text);
        let path = completion_dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// qrbd(8): clap_mangen's page with FILES, ENVIRONMENT, SIGNALS, EXAMPLES and SEE ALSO added
/// before its VERSION section.
fn main_page(cmd: &clap::Command) -> anyhow::Result<Vec<u8>> {
    let man = Man::new(cmd.clone())
        .title("QRBD")
        .section(SECTION)
        .manual("System Administration");
    let mut page = Vec::new();
    man.render(&mut page)?;
    let mut page = String::from_utf8(page).context("the man page is not UTF-8")?;
    let at = page.find("\n.SH VERSION").map_or(page.len(), |at| at + 1);
    page.insert_str(at, EXTRA_SECTIONS);
    Ok(page.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pages_and_completions() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = generate(dir.path()).expect("generated");
        let page = std::fs::read_to_string(dir.path().join("man8/qrbd.8")).expect("qrbd.8");
        assert!(page.contains("\n.TH QRBD 8 "), "{}", &page[..200]);
        for word in [
            "check\\-config",
            "create\\-md",
            "qrbd\\-status(8)",
            ".SH FILES",
            "/etc/qrbd/qrbd.toml",
            ".SH SEE ALSO",
        ] {
            assert!(page.contains(word), "qrbd.8 lacks {word:?}");
        }
        assert!(
            !page.contains("generate\\-docs"),
            "the hidden command leaked"
        );
        assert!(dir.path().join("man8/qrbd-status.8").exists());
        assert!(!dir.path().join("man8/qrbd-generate-docs.8").exists());
        for file in ["qrbd.bash", "_qrbd", "qrbd.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file))
                .expect("completion");
            assert!(text.contains("check-config"), "{file} lacks check-config");
            assert!(
                !text.contains("generate-docs"),
                "{file} offers the hidden command"
            );
        }
        assert!(written.len() > 10, "{written:?}");
    }
}
