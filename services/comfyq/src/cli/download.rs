//! A job's outputs saved to a directory: streamed to `.<name>.part`, checked
//! against the size and SHA-256 the job lists, then renamed into place, so a
//! file under its real name is always whole.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::Console;
use super::client::Api;
use super::error::CliError;
use super::progress::download_bar;
use super::render::OutputView;

#[derive(Debug)]
pub(crate) struct Saved {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
}

pub(crate) async fn save_outputs(
    api: &Api,
    outputs: &[OutputView],
    dir: &Path,
    console: &Console,
) -> Result<Vec<Saved>, CliError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let mut saved = Vec::with_capacity(outputs.len());
    for output in outputs {
        saved.push(save_one(api, output, dir, console).await?);
    }
    Ok(saved)
}

async fn save_one(
    api: &Api,
    output: &OutputView,
    dir: &Path,
    console: &Console,
) -> Result<Saved, CliError> {
    // The name comes from the server: never let it leave the directory.
    let name = Path::new(&output.name)
        .file_name()
        .filter(|n| n.to_str() == Some(output.name.as_str()))
        .ok_or_else(|| {
            CliError::Protocol(format!("output name {:?} is not a file name", output.name))
        })?;
    let path = dir.join(name);
    let partial = dir.join(format!(".{}.part", output.name));
    let response = api.send(api.get(&output.url)).await?;
    let bar = download_bar(console, &output.name, output.size);
    let local = |e: std::io::Error| CliError::Local(format!("writing {}: {e}", partial.display()));
    let mut file = tokio::fs::File::create(&partial).await.map_err(local)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| api.transport(e))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        bar.set_position(size);
        file.write_all(&chunk).await.map_err(local)?;
    }
    file.flush().await.map_err(local)?;
    drop(file);
    bar.finish_and_clear();
    let sha256 = hex::encode(hasher.finalize());
    if size != output.size || (!output.sha256.is_empty() && sha256 != output.sha256) {
        let _ = tokio::fs::remove_file(&partial).await; // Best effort: it is corrupt anyway.
        return Err(CliError::Protocol(format!(
            "output {} arrived with {size} bytes and SHA-256 {sha256}; the job lists {} bytes and {}",
            output.name, output.size, output.sha256
        )));
    }
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(|e| CliError::Local(format!("moving {} into place: {e}", path.display())))?;
    Ok(Saved { path, size })
}
