fn main() -> std::process::ExitCode {
    agentca::cli::run()
}
