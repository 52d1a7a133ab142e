fn main() -> std::process::ExitCode {
    pgferry::cli::main()
}
