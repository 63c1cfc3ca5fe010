@echo off
rem Start Video Trainer. Runs installers\install.bat first when the install is missing or did
rem not finish (no .venv\.video-trainer-installed). Arguments are passed on to main.py.
setlocal EnableExtensions DisableDelayedExpansion
rem Exit codes are checked with "if errorlevel" (not && or ||), as in install.bat.

rem The project root is the parent of this script's folder.
for %%I in ("%~dp0..") do set "ROOT=%%~fI"

if exist "%ROOT%\.venv\.video-trainer-installed" goto :run
echo Video Trainer is not installed yet (or the last install did not finish); installing first.
call "%ROOT%\installers\install.bat"
if errorlevel 1 goto :install_failed

:run
rem pythonw.exe: no console window. main.py writes errors to its log file in the user's
rem log folder, since there is no console to show them in.
start "" "%ROOT%\.venv\Scripts\pythonw.exe" "%ROOT%\main.py" %*
exit /b 0

:install_failed
echo.
echo Installation failed; see the messages above. Fix the problem, then run installers\start.bat again.
rem Double-clicked in Explorer, the window closes when we exit: let the user read it first.
echo %CMDCMDLINE% | find /i "%~nx0" >nul 2>&1
if not errorlevel 1 pause
exit /b 1
