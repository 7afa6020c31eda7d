//! What the SMTP sink takes on its own, so that a reader can tell whether
//! it bounds the end-to-end figures: senders that each deliver messages
//! one after another, with the dialogue zapflow's mailer speaks (EHLO once
//! per connection, then MAIL, RCPT and DATA in one write, and the message).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use zapflow_testkit::SmtpSink;

/// Messages per second the sink accepted from `senders` connections
/// delivering `messages` in all.
pub async fn messages_per_second(sink: &SmtpSink, senders: usize, messages: usize) -> Result<f64> {
    let address = sink
        .url()
        .strip_prefix("smtp://")
        .context("the sink's URL")?
        .to_owned();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..senders {
        let address = address.clone();
        tasks.spawn(async move { deliver(&address, messages / senders).await });
    }
    while let Some(delivered) = tasks.join_next().await {
        delivered??;
    }
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    Ok((messages / senders * senders) as f64 / elapsed.as_secs_f64())
}

async fn deliver(address: &str, messages: usize) -> Result<()> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (reader, mut writer) = stream.into_split();
    let mut replies = BufReader::new(reader);
    expect(&mut replies, "220").await?;
    writer.write_all(b"EHLO bench\r\n").await?;
    expect(&mut replies, "250").await?;
    for _ in 0..messages {
        writer
            .write_all(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n")
            .await?;
        for reply in ["250", "250", "354"] {
            expect(&mut replies, reply).await?;
        }
        writer
            .write_all(b"Subject: sink check\r\n\r\nsink check\r\n.\r\n")
            .await?;
        expect(&mut replies, "250").await?;
    }
    writer.write_all(b"QUIT\r\n").await?;
    Ok(())
}

/// Reads one reply (all its lines) and checks its code.
async fn expect(replies: &mut BufReader<tokio::net::tcp::OwnedReadHalf>, code: &str) -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if replies.read_line(&mut line).await? == 0 {
            bail!("the sink closed the connection");
        }
        if !line.starts_with(code) {
            bail!("the sink answered {line:?}, expected {code}");
        }
        // "250-" continues a reply; "250 " ends it.
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
}
