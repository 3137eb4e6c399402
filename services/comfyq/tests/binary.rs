//! The `comfyq` binary itself: `up` and the client commands share one parser
//! (global `--url`, `--api-key`, `--json`), and exit codes reach the shell.

use std::process::{Command, Output};

fn comfyq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_comfyq"))
        .args(args)
        .env_remove("COMFYQ_URL")
        .env_remove("COMFYQ_API_KEY")
        .output()
        .expect("run the comfyq binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_up_beside_the_client_commands_and_the_exit_codes() {
    let help = comfyq(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let stdout = text(&help.stdout);
    for part in [
        "up ",
        "submit ",
        "watch ",
        "dead-letters ",
        "--api-key",
        "Exit codes:",
    ] {
        assert!(stdout.contains(part), "no {part:?} in {stdout}");
    }
    let up = text(&comfyq(&["up", "--help"]).stdout);
    assert!(up.contains("--sim") && up.contains("--api-key"), "{up}");
}

#[test]
fn exit_codes_reach_the_shell() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener); // Nothing listens there now.
    let unreachable = comfyq(&["--url", &url, "queue"]);
    assert_eq!(unreachable.status.code(), Some(5), "{unreachable:?}");
    assert!(text(&unreachable.stderr).contains("cannot reach the comfyq API"));
    // Global options go after the subcommand too.
    let after = comfyq(&["queue", "--json", "--url", &url]);
    assert_eq!(after.status.code(), Some(5), "{after:?}");
    let usage = comfyq(&["job"]);
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
}
