//! Every code block a user would paste from the docs is run here, or marked as not run.
//!
//! The blocks are the fenced code blocks of every markdown file in the repository (README.md,
//! docs/, deploy/, ...). By its info string, a block is:
//! - `text`: output, or a syntax shown; nobody pastes it, so it is not run;
//! - `sh`: run with `bash -euo pipefail` from the repository root, with `hirehop-relay` on
//!   `PATH` (the binary under test) and `RELAY_*` set for a relay this test starts on its own
//!   exchange, accepting the export key `change-me`. The docs' relay listens on
//!   `127.0.0.1:8080`; the test's relay listens on a port of its own, which replaces
//!   `127.0.0.1:8080` in the block. The block must exit 0, and every `message_id` it prints
//!   (a 202's body) must reach the broker;
//! - `toml`: loaded by `hirehop-relay --config FILE check-config` (with an export key in the
//!   environment, for fragments that configure none), which must accept it;
//! - `python`, `js`: a consumer, run with pika or amqplib (installed under target/ by
//!   `docs-clients.sh` beside this file) and `AMQP_URL`, `EXCHANGE`, `QUEUE` naming the test's
//!   broker, relay exchange and a queue of its own. It must print a webhook the relay accepted,
//!   once even when the broker delivers it twice, ack what it handled, and leave the webhook
//!   its handler refuses (one without `data.ID`) in the dead-letter queue `<QUEUE>.dead`.
//!   `examples/consumer.rs` is held to the same.
//!
//! Any block can instead be preceded by a line `<!-- not run: <why> -->` (a Docker or
//! Kubernetes command, an installer, something that changes the machine or the whole broker).
//! A block in any other language needs that line.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::StatusCode;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::harness::{self, KEY, PATIENCE, TestRelay, amqp_url, catch_all, eventually};

/// The export key the docs use.
const DOCS_KEY: &str = "change-me";

/// The address the docs give the relay.
const DOCS_ADDR: &str = "127.0.0.1:8080";

/// The languages this test knows how to run; `text` is never run.
const RUN: [&str; 4] = ["sh", "toml", "python", "js"];

/// One fenced code block.
struct Block {
    /// Relative to the repository root.
    file: PathBuf,
    /// Of the opening fence, from 1.
    line: usize,
    info: String,
    code: String,
    /// The reason given by a `<!-- not run: ... -->` line right before the block.
    not_run: Option<String>,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every markdown file of the repository, but what builds and tools leave in it.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if !matches!(
                    &*name,
                    "target" | ".git" | "node_modules" | "corpus" | "artifacts"
                ) {
                    walk(&path, found);
                }
            } else if name.ends_with(".md") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(root(), &mut found);
    found
}

/// The fenced code blocks of a CommonMark text: a fence is three or more backticks or tildes,
/// indented by up to three spaces (inside a list item), closed by a line of at least as many
/// of the same character.
fn parse(file: &Path, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start_matches(' ');
        let indent = lines[i].len() - trimmed.len();
        let fence_char = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let fence_len = fence_char.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        let (Some(fence_char), true) = (fence_char, indent <= 3 && fence_len >= 3) else {
            i += 1;
            continue;
        };
        let not_run = lines[..i]
            .iter()
            .rev()
            .find(|line| !line.trim().is_empty())
            .and_then(|line| {
                let comment = line.trim().strip_prefix("<!-- not run:")?;
                Some(comment.strip_suffix("-->")?.trim().to_owned())
            });
        let mut code = String::new();
        let mut end = i + 1;
        while end < lines.len() {
            let line = lines[end];
            let content = line.trim_start_matches(' ');
            let closes = line.len() - content.len() <= 3
                && content.trim_end().len() >= fence_len
                && content.trim_end().chars().all(|c| c == fence_char);
            if closes {
                break;
            }
            // Content lines lose the opening fence's indentation, as far as they have it.
            let strip = (line.len() - content.len()).min(indent);
            code.push_str(&line[strip..]);
            code.push('\n');
            end += 1;
        }
        blocks.push(Block {
            file: file.strip_prefix(root()).unwrap_or(file).to_owned(),
            line: i + 1,
            info: trimmed[fence_len..].trim().to_owned(),
            code,
            not_run,
        });
        i = end + 1;
    }
    blocks
}

fn all_blocks() -> Vec<Block> {
    markdown_files()
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
            parse(path, &text)
        })
        .collect()
}

/// The blocks of `language` this test runs (not marked as not run).
fn to_run(language: &str) -> Vec<Block> {
    let blocks: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|block| block.info == language && block.not_run.is_none())
        .collect();
    println!("{} {language} block(s) to run", blocks.len());
    blocks
}

#[test]
fn the_block_parser_handles_indented_fences_and_markers() {
    let text = "intro\n\n<!-- not run: needs a cluster -->\n\n   ```sh\n   kubectl apply\n     indented\n   ```\n\n````text\n```\n````\n";
    let blocks = parse(Path::new("x.md"), text);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].info, "sh");
    assert_eq!(blocks[0].line, 5);
    assert_eq!(blocks[0].code, "kubectl apply\n  indented\n");
    assert_eq!(blocks[0].not_run.as_deref(), Some("needs a cluster"));
    assert_eq!(blocks[1].info, "text");
    assert_eq!(blocks[1].code, "```\n");
    assert_eq!(blocks[1].not_run, None);
}

#[test]
fn every_block_in_the_docs_is_run_or_marked_not_run() {
    let blocks = all_blocks();
    let mut problems = Vec::new();
    for block in &blocks {
        match (&block.not_run, block.info.as_str()) {
            (Some(reason), _) if reason.is_empty() => {
                problems.push(format!("{}: say why it is not run", block.at()));
            }
            (Some(_), _) | (None, "text") => {}
            (None, language) if RUN.contains(&language) => {}
            (None, "") => problems.push(format!(
                "{}: a block without a language: name it (`text` for output), or put \
                 `<!-- not run: <why> -->` before it",
                block.at()
            )),
            (None, language) => problems.push(format!(
                "{}: this test does not run `{language}` blocks: put `<!-- not run: <why> -->` \
                 before it",
                block.at()
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The scan must have found what we know is there, or it proves nothing.
    for language in RUN {
        assert!(
            blocks
                .iter()
                .any(|b| b.info == language && b.not_run.is_none()),
            "no {language} block to run was found: is the scan broken?"
        );
    }
}

/// The consumer examples' clients under target/, installed once per test process.
fn clients() -> &'static Path {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = root().join("target/docs-clients");
        let output = std::process::Command::new("bash")
            .arg(root().join("tests/relay/docs-clients.sh"))
            .arg(&dir)
            .output()
            .expect("bash runs");
        assert!(
            output.status.success(),
            "tests/relay/docs-clients.sh could not install the consumer examples' clients:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        dir
    })
}

/// A directory with `hirehop-relay` in it, the binary under test, for blocks to find on PATH.
fn relay_on_path() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("docs-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("hirehop-relay");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_hirehop-relay"), &link).unwrap();
    dir
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `command` to its end, for [`PATIENCE`] twice at most; its status, stdout and stderr.
async fn run(command: Command, what: &str) -> (std::process::ExitStatus, String, String) {
    run_for(command, what, PATIENCE * 2).await
}

async fn run_for(
    mut command: Command,
    what: &str,
    ceiling: Duration,
) -> (std::process::ExitStatus, String, String) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(ceiling, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish in {ceiling:?}"))
        .unwrap_or_else(|err| panic!("{what} could not start: {err}"));
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn shell_blocks_run_against_a_relay() {
    let relay = TestRelay::builder()
        .env("RELAY_AUTH__EXPORT_KEYS", DOCS_KEY)
        .start()
        .await;
    let broker = harness::broker().await;
    let mut arrived = catch_all(&broker, &relay.exchange).await;
    let bin = relay_on_path();
    let spool = harness::spool_dir(&format!("{}-blocks", relay.exchange));
    let addr = relay.addr.to_string();
    for block in to_run("sh") {
        let script = block.code.replace(DOCS_ADDR, &addr);
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(root())
            .env_clear()
            .env("PATH", path_with(&bin))
            .env("HOME", std::env::temp_dir())
            .env("RELAY_AMQP__URL", amqp_url())
            .env("RELAY_AMQP__EXCHANGE", relay.exchange.as_str())
            .env("RELAY_AUTH__EXPORT_KEYS", DOCS_KEY)
            .env("RELAY_SPOOL__DIR", &spool);
        let (status, stdout, stderr) = run(command, &block.at()).await;
        assert!(
            status.success(),
            "{} failed ({status}):\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            block.at()
        );
        // What the relay accepted for the block reached the broker.
        let ids: Vec<String> = stdout
            .split("\"message_id\":\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_owned)
            .collect();
        println!("{}: ok, {} webhook(s) accepted", block.at(), ids.len());
        arrived.expect_all(ids).await;
    }
    let _ = std::fs::remove_dir_all(&bin);
    let _ = std::fs::remove_dir_all(&spool);
    relay.stop().await;
}

#[tokio::test]
async fn toml_blocks_pass_check_config() {
    let dir = std::env::temp_dir().join(format!("docs-toml-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for block in to_run("toml") {
        let file = dir.join(format!("line-{}.toml", block.line));
        std::fs::write(&file, &block.code).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_hirehop-relay"));
        command
            .arg("--config")
            .arg(&file)
            .arg("check-config")
            .env_clear()
            .env("RELAY_AUTH__EXPORT_KEYS", DOCS_KEY);
        let (status, _, stderr) = run(command, &block.at()).await;
        assert!(
            status.success(),
            "check-config refuses {}:\n{}\n{stderr}",
            block.at(),
            block.code
        );
        println!("{}: ok", block.at());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn python_consumers_handle_dedupe_and_dead_letter() {
    let python = clients().join("venv/bin/python");
    for block in to_run("python") {
        let file = std::env::temp_dir().join(format!("consumer-{}.py", uuid::Uuid::now_v7()));
        std::fs::write(&file, &block.code).unwrap();
        let mut command = Command::new(&python);
        command.arg(&file).env("PYTHONUNBUFFERED", "1");
        check_consumer(command, &block.at(), Launch::EnvQueue).await;
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test]
async fn node_consumers_handle_dedupe_and_dead_letter() {
    let modules = clients().join("node/node_modules");
    for block in to_run("js") {
        let file = std::env::temp_dir().join(format!("consumer-{}.js", uuid::Uuid::now_v7()));
        std::fs::write(&file, &block.code).unwrap();
        let mut command = Command::new("node");
        command.arg(&file).env("NODE_PATH", &modules);
        check_consumer(command, &block.at(), Launch::EnvQueue).await;
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test]
async fn the_rust_example_consumer_handles_dedupe_and_dead_letter() {
    // Built by cargo as docs/consumers.md says to run it; the examples are not built for
    // `--test`.
    // In a user's environment, not the one cargo gives tests (its CARGO_* variables would
    // make this build's artifacts differ from those of a `cargo build` in a shell, so each
    // would rebuild what the other built).
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--example", "consumer"])
        .current_dir(root())
        .env_clear()
        .envs(std::env::vars().filter(|(name, _)| {
            matches!(
                name.as_str(),
                "PATH" | "HOME" | "CARGO_HOME" | "RUSTUP_HOME" | "CARGO_TARGET_DIR"
            )
        }));
    // Usually fresh (`cargo test` builds the examples first); a build from scratch on a busy
    // machine takes minutes.
    let ceiling = Duration::from_secs(600);
    let (status, _, stderr) = run_for(build, "cargo build --example consumer", ceiling).await;
    assert!(
        status.success(),
        "examples/consumer.rs does not build:\n{stderr}"
    );
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let command = Command::new(target.join("debug/examples/consumer"));
    check_consumer(command, "examples/consumer.rs", Launch::QueueArgument).await;
}

/// How a consumer is told its queue.
enum Launch {
    /// `QUEUE` in the environment (the consumers of docs/consumers.md).
    EnvQueue,
    /// `QUEUE BINDING` as arguments (`examples/consumer.rs`).
    QueueArgument,
}

/// Runs the consumer `command` against a relay of its own and checks what the docs promise:
/// a webhook the relay accepted is printed and acked, a duplicate delivery of it is acked and
/// not printed again, and one its handler refuses ends up in `<QUEUE>.dead`.
async fn check_consumer(mut command: Command, what: &str, launch: Launch) {
    let relay = TestRelay::start().await;
    // The consumer declares two quorum queues: deleted with the relay's exchange.
    let queue = relay.exchange.own("jobs");
    let dead = relay.exchange.own("jobs.dead");
    match launch {
        Launch::EnvQueue => command.env("QUEUE", &queue),
        Launch::QueueArgument => command.args([queue.as_str(), "job.#"]),
    };
    command
        .env("AMQP_URL", amqp_url())
        .env("EXCHANGE", relay.exchange.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut consumer = Consumer::spawn(command, what);
    let broker = harness::broker().await;
    consumer.wait_consuming(&broker, &queue).await;

    // A webhook, then the same message again (as a relay replaying it would publish it).
    let (first_id, first_body) = post(&relay, 1001, true).await;
    consumer.wait_for("data.ID=1001").await;
    let channel = broker.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("replayed".into(), AMQPValue::Boolean(true));
    let duplicate = BasicProperties::default()
        .with_message_id(first_id.as_str().into())
        .with_type("job.status.updated".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    channel
        .basic_publish(
            relay.exchange.as_str().into(),
            "job.status.updated".into(),
            BasicPublishOptions::default(),
            &first_body,
            duplicate,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // One the handler refuses, then one more it handles: the consumer handles messages in
    // order, so once that one is printed, the two before it were dealt with.
    let (refused_id, _) = post(&relay, 0, false).await;
    post(&relay, 1002, true).await;
    consumer.wait_for("data.ID=1002").await;
    let first_count = consumer
        .lines()
        .filter(|l| l.contains("data.ID=1001"))
        .count();
    assert_eq!(
        first_count,
        1,
        "{what} handled the duplicate again:\n{}",
        consumer.output()
    );
    wait_messages(&broker, &dead, 1, &consumer).await;

    // Stopped, the consumer leaves nothing unacked behind: the broker would give it back to
    // the queue.
    consumer.kill().await;
    let gone = format!("the broker to count no consumer on {queue}");
    let messages = eventually(&gone, PATIENCE, || async {
        match counts(&broker, &queue).await {
            (messages, 0) => Ok(messages),
            (_, consumers) => Err(format!("{consumers} consumers")),
        }
    })
    .await;
    assert_eq!(
        messages,
        0,
        "{what} did not ack everything it handled:\n{}",
        consumer.output()
    );
    let kept = channel
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the refused webhook is in the dead-letter queue");
    assert_eq!(harness::message_id(&kept.delivery), refused_id);

    relay.stop().await;
}

/// Posts a webhook for `job.status.updated` with `data.ID` (or without, when `with_id` is
/// false) to `relay`; its message id and body.
async fn post(relay: &TestRelay, id: u64, with_id: bool) -> (String, Vec<u8>) {
    let data = if with_id {
        serde_json::json!({"ID": id, "STATUS": 2})
    } else {
        serde_json::json!({"STATUS": 2})
    };
    let body = serde_json::json!({
        "time": "2022-03-29 07:50:42",
        "user_id": 1,
        "company_id": 1,
        "export_key": KEY,
        "event": "job.status.updated",
        "data": data,
        "changes": {},
    })
    .to_string();
    let reply = relay.post(body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    (reply.message_id(), body.into_bytes())
}

/// Ready messages and consumers of `queue`; none of either before a consumer declares it.
async fn counts(broker: &lapin::Connection, queue: &str) -> (u32, u32) {
    harness::queue_counts(broker, queue).await.unwrap_or((0, 0))
}

/// Waits until `queue` holds `n` ready messages.
async fn wait_messages(broker: &lapin::Connection, queue: &str, n: u32, consumer: &Consumer) {
    eventually(
        &format!("{queue} to hold {n} messages"),
        PATIENCE,
        || async {
            match counts(broker, queue).await {
                (messages, _) if messages == n => Ok(()),
                (messages, _) => Err(format!(
                    "{messages} messages; {} printed:\n{}",
                    consumer.what,
                    consumer.output()
                )),
            }
        },
    )
    .await;
}

/// A consumer process; its stdout is read line by line, its stderr kept for failures.
struct Consumer {
    what: String,
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Consumer {
    fn spawn(mut command: Command, what: &str) -> Consumer {
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("{what} could not start: {err}"));
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Consumer {
            what: what.to_owned(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    fn lines(&self) -> impl Iterator<Item = &String> {
        self.seen.iter()
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.seen.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits until the consumer has declared and bound `queue` and consumes from it.
    async fn wait_consuming(&self, broker: &lapin::Connection, queue: &str) {
        let what = format!("{} to consume from {queue}", self.what);
        eventually(&what, PATIENCE, || async {
            match counts(broker, queue).await {
                (_, 0) => Err(self.output()),
                _ => Ok(()),
            }
        })
        .await;
    }

    /// Waits for a stdout line containing `needle`.
    async fn wait_for(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !self.seen.iter().any(|line| line.contains(needle)) {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) | Err(_) => {
                    panic!("{} never printed {needle:?}:\n{}", self.what, self.output())
                }
            }
        }
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(PATIENCE, self.child.wait()).await;
        // What it printed before it died.
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }
}
