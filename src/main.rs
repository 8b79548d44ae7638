use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use qrbd::admin::{self, AdminRequest, AdminResponse};
use qrbd::cli::{Cli, Command};
use qrbd::config::{self, QrbdConfig};
use qrbd::{daemon, demo, resources, status_text};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = init_logging(&cli) {
        eprintln!("error: {error:#}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let default_level = match cli.command {
        Command::Daemon | Command::Demo { .. } => "info",
        _ => "warn",
    };
    let filter = match &cli.log_level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("invalid --log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

fn load_config(cli: &Cli) -> anyhow::Result<QrbdConfig> {
    Ok(config::load(&cli.config)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::CheckConfig => {
            let config = load_config(&cli)?;
            println!(
                "{}: configuration is valid: node {:?} (id {}), {} resource(s)",
                config.source.display(),
                config.node.name,
                config.node.id,
                config.resources.len()
            );
            for resource in &config.resources {
                println!(
                    "  {}: {} protocol {} peers {}{}",
                    resource.name,
                    status_text::human_bytes(resource.size_bytes),
                    resource.protocol,
                    resource.peers.len(),
                    if resource.allow_two_primaries {
                        " two-primaries allowed"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Command::CreateMd { resource, force } => {
            let config = load_config(&cli)?;
            let resource = config.resource(resource)?;
            println!("{}", resources::create_metadata(&config, resource, *force)?);
            Ok(())
        }
        Command::Daemon => daemon::run(load_config(&cli)?),
        Command::Demo { size } => demo::run_demo(size),
        Command::GenerateDocs { out_dir } => {
            for path in qrbd::gendocs::generate(out_dir)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::GenCert { ca_dir, node } => {
            for path in qrbd::transport::generate_certificates(ca_dir, node.as_deref())? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Events => {
            let config = load_config(&cli)?;
            admin::stream_events(&config.node.admin_socket, &mut std::io::stdout())?;
            Ok(())
        }
        Command::Status {
            resource,
            watch: true,
            ..
        } => {
            let config = load_config(&cli)?;
            qrbd::watch::watch(
                &config.node.admin_socket,
                resource.clone(),
                &mut std::io::stdout(),
            )
        }
        Command::Status { resource, json, .. } => {
            let config = load_config(&cli)?;
            let request = AdminRequest::Status {
                resource: resource.clone(),
            };
            match admin::request(&config.node.admin_socket, &request)? {
                AdminResponse::Status { resources } if *json => {
                    println!("{}", serde_json::to_string_pretty(&resources)?);
                    Ok(())
                }
                AdminResponse::Status { resources } => {
                    print!("{}", status_text::render(&resources));
                    Ok(())
                }
                other => answer(other),
            }
        }
        command => {
            let config = load_config(&cli)?;
            let request = match command {
                Command::Up { resource } => AdminRequest::Up {
                    resource: resource.clone(),
                },
                Command::Down { resource } => AdminRequest::Down {
                    resource: resource.clone(),
                },
                Command::Primary { resource, force } => AdminRequest::Primary {
                    resource: resource.clone(),
                    force: *force,
                },
                Command::Secondary { resource } => AdminRequest::Secondary {
                    resource: resource.clone(),
                },
                Command::Invalidate { resource } => AdminRequest::Invalidate {
                    resource: resource.clone(),
                    remote: false,
                },
                Command::InvalidateRemote { resource } => AdminRequest::Invalidate {
                    resource: resource.clone(),
                    remote: true,
                },
                Command::Verify { resource } => AdminRequest::Verify {
                    resource: resource.clone(),
                },
                Command::NewCurrentUuid {
                    resource,
                    clear_bitmap,
                } => {
                    if !*clear_bitmap {
                        anyhow::bail!(
                            "new-current-uuid needs --clear-bitmap: qrbd starts new data \
                             generations on its own whenever a Primary writes without a peer; \
                             the command only skips the initial sync of blank replicas"
                        );
                    }
                    AdminRequest::SkipInitialSync {
                        resource: resource.clone(),
                    }
                }
                Command::SuspendIo { resource } => AdminRequest::SuspendIo {
                    resource: resource.clone(),
                },
                Command::ResumeIo { resource } => AdminRequest::ResumeIo {
                    resource: resource.clone(),
                },
                Command::Connect {
                    resource,
                    discard_my_data,
                } => AdminRequest::Connect {
                    resource: resource.clone(),
                    discard_my_data: *discard_my_data,
                },
                Command::Disconnect { resource } => AdminRequest::Disconnect {
                    resource: resource.clone(),
                },

                other => bail!("unhandled command {other:?}"),
            };
            answer(admin::request(&config.node.admin_socket, &request)?)
        }
    }
}

fn answer(response: AdminResponse) -> anyhow::Result<()> {
    match response {
        AdminResponse::Done { message } => {
            println!("{message}");
            Ok(())
        }
        AdminResponse::Failed { message } => bail!("{message}"),
        AdminResponse::Status { .. } => bail!("the daemon answered with a status to a command"),
    }
}
